# Copy to environments/<environment>.tfvars (prod.tfvars, staging.tfvars, dev.tfvars):
# `python -m deploy --environment <environment>` passes that file to Terraform.
# project_id, region, environment and image come from the deploy helper's flags.
# Every variable is described in ../variables.tf; unset ones keep their defaults.

# Browser origins besides the service's own run.app URL (custom domains).
cors_allowed_origins = ["https://chat.example.com"]

# Who gets the alerts (dead letters, replies stuck in streaming).
alert_emails = ["oncall@example.com"]

# Scaling of the socket service.
socket_min_instances = 1
socket_max_instances = 20

# Model: gemini on Vertex AI (the function's own service account), openai, or offline.
ai_provider  = "gemini"
gemini_model = "gemini-2.5-flash"

# Tokens: HS256 with the chat-jwt-secret Secret Manager secret (default), or
# Identity Platform (RS256 ID tokens) instead:
# jwt_algorithms = ["RS256"]
# jwt_jwks_url   = "https://www.googleapis.com/service_accounts/v1/jwk/securetoken@system.gserviceaccount.com"
# jwt_issuer     = "https://securetoken.google.com/PROJECT_ID"
# jwt_audience   = "PROJECT_ID"
