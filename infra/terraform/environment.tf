# Environment variables of the deployables, side by side: the socket service
# (run.tf) and the functions (functions.tf) set what these locals give them.
# Each setting is documented in the README's settings tables and read by the
# deployable's settings module; tests/infra/test_settings_env.py checks that
# Terraform sets what each one reads, and a shared setting the same everywhere.
#
# Per deployable:
#   <deployable>_env           always set;
#   <deployable>_optional_env  tunables, left out when null or empty so that the
#                              application default applies (only variables here,
#                              so which ones are set is known at plan time);
#   <deployable>_environment   what its resource sets: the shared maps below
#                              merged with its own, optional values filtered.
# Secrets are given by Secret Manager secret id, never by value.

locals {
  # -- shared --------------------------------------------------------------------
  # Every deployable (socket service, upload functions, ai_stream).
  shared_env = {
    CHAT_ENV             = "production"
    GOOGLE_CLOUD_PROJECT = var.project_id
    FIRESTORE_DATABASE   = google_firestore_database.main.name
    LOG_LEVEL            = var.log_level
    UPLOAD_BUCKET        = google_storage_bucket.uploads.name
    # Publish through the regional endpoint: Pub/Sub orders an ordering key
    # only among publishes made in one region.
    PUBSUB_REGION = var.region
  }

  # The deployables that take a user's token (socket service, upload functions):
  # they check it alike, allow the same browser origins, and enforce or
  # advertise the same limits.
  token_env = {
    JWT_ALGORITHMS = join(",", var.jwt_algorithms)
    # Browsers send Origin on the WebSocket handshake too, so the page's own
    # origin must be listed.
    CORS_ALLOWED_ORIGINS = join(",", local.cors_origins)
  }
  token_optional_env = {
    JWT_PUBLIC_KEY        = var.jwt_public_key
    JWT_JWKS_URL          = var.jwt_jwks_url
    JWT_ISSUER            = var.jwt_issuer
    JWT_AUDIENCE          = var.jwt_audience
    JWT_LEEWAY_SECONDS    = var.jwt_leeway_seconds
    MAX_MESSAGE_CHARS     = var.max_message_chars
    MAX_UPLOAD_BYTES      = var.max_upload_bytes
    ALLOWED_CONTENT_TYPES = join(",", var.allowed_content_types)
  }
  # Set only when an HS* algorithm is allowed (local.jwt_uses_hmac).
  token_secret_env = {
    JWT_SECRET = google_secret_manager_secret.jwt.secret_id
  }

  # -- socket service (socket_service/settings.py) ---------------------------------
  socket_service_env = {
    # Never in production (the service refuses to start with it anyway).
    DEV_TOKENS              = "0"
    UPLOAD_URL              = google_cloudfunctions2_function.functions["request_upload"].url
    SIGNING_SERVICE_ACCOUNT = google_service_account.socket.email
    AI_PROVIDER             = var.ai_provider
    AI_MAX_REPLY_SECONDS    = var.ai_max_reply_seconds
  }
  socket_service_optional_env = {
    AI_MAX_CONCURRENT_PER_USER = var.ai_max_concurrent_per_user
    AI_MESSAGES_PER_WINDOW     = var.ai_messages_per_window
    AI_WINDOW_SECONDS          = var.ai_window_seconds
    # Empty: nobody may frame the chat (frame-ancestors 'none').
    FRAME_ANCESTORS = join(",", var.frame_ancestors)
  }
  socket_service_environment = { for k, v in merge(local.shared_env, local.token_env, local.socket_service_env, {
    for name, value in merge(local.token_optional_env, local.socket_service_optional_env) : name => value if value != null && value != ""
  }) : k => tostring(v) }

  # -- upload functions (functions/upload/uploads/settings.py) ---------------------
  # Both targets, request_upload and on_upload_finalized, read the same settings.
  upload_env = {
    UPLOAD_PENDING_TTL_SECONDS = local.uploads_layout.pending_ttl_seconds
    SIGNING_SERVICE_ACCOUNT    = google_service_account.upload.email
    # The storage quota counts the days the bucket keeps (storage.tf).
    UPLOAD_RETENTION_DAYS = var.upload_retention_days
    # functions-framework (gunicorn) threads = requests served at once.
    THREADS = var.upload_concurrency
  }
  upload_optional_env = {
    UPLOAD_URL_TTL_SECONDS = var.upload_url_ttl_seconds
    UPLOADS_PER_WINDOW     = var.uploads_per_window
    UPLOAD_WINDOW_SECONDS  = var.upload_window_seconds
    # Storage one user's files may take over the retention period.
    UPLOAD_USER_QUOTA_BYTES = var.upload_user_quota_bytes
  }
  upload_environment = { for k, v in merge(local.shared_env, local.token_env, local.upload_env, {
    for name, value in merge(local.token_optional_env, local.upload_optional_env) : name => value if value != null && value != ""
  }) : k => tostring(v) }

  # -- ai_stream (functions/ai_stream/aistream/settings.py) ------------------------
  ai_stream_env = {
    AI_PROVIDER          = var.ai_provider
    AI_MAX_REPLY_SECONDS = var.ai_max_reply_seconds
    # Vertex AI with the function's own account unless an API key is given.
    GEMINI_USE_VERTEXAI     = var.gemini_api_key_secret == "" ? "1" : "0"
    OPENAI_MAX_TOKENS_FIELD = var.openai_max_tokens_field
    # functions-framework (gunicorn) threads = replies streamed at once.
    THREADS = var.ai_stream_concurrency
  }
  ai_stream_optional_env = {
    AI_SYSTEM_PROMPT         = var.ai_system_prompt
    AI_MAX_OUTPUT_TOKENS     = var.ai_max_output_tokens
    PROVIDER_TIMEOUT_SECONDS = var.provider_timeout_seconds
    GEMINI_MODEL             = var.gemini_model
    GEMINI_LOCATION          = var.gemini_location
    OPENAI_BASE_URL          = var.openai_base_url
    OPENAI_MODEL             = var.openai_model
    OPENAI_ORGANIZATION      = var.openai_organization
    # Hosts OPENAI_BASE_URL may name in production; the budget of all replies together.
    OPENAI_ALLOWED_HOSTS      = join(",", var.openai_allowed_hosts)
    AI_GLOBAL_TOKENS_PER_HOUR = var.ai_global_tokens_per_hour
  }
  ai_stream_environment = { for k, v in merge(local.shared_env, local.ai_stream_env, {
    for name, value in local.ai_stream_optional_env : name => value if value != null && value != ""
  }) : k => tostring(v) }
  # The model API keys, when configured (their secrets are created by hand).
  ai_stream_secret_env = {
    OPENAI_API_KEY = var.openai_api_key_secret
    GEMINI_API_KEY = var.gemini_api_key_secret
  }
}
