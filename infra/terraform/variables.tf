# Inputs of the deployment. Tunables whose default is null are not set in the
# deployables' environment at all, so the application default (README.md,
# settings tables) applies and is never written twice.

# What several variables' validation rules share (Terraform >= 1.9: a rule may
# name other values of the module; these stay in this file, which tests/infra
# also plans on its own).
locals {
  # A browser origin, as CORS and frame-ancestors compare it: scheme, host and
  # port, without a path, a trailing slash or a wildcard.
  https_origin_pattern = "^https://[a-z0-9.-]+(:[0-9]+)?$"
  # Tokens are checked with a public key (a JWKS URL or a PEM) rather than a
  # shared secret alone: their iss and aud must then be checked too.
  jwt_public_key_configured = var.jwt_jwks_url != "" || var.jwt_public_key != ""
}

# -- where -------------------------------------------------------------------
variable "project_id" {
  type        = string
  description = "Google Cloud project to deploy into (one project per environment: topic and bucket names come from chatcore/topology.json and are the same in every environment)."

  validation {
    condition     = can(regex("^[a-z][a-z0-9-]{4,28}[a-z0-9]$", var.project_id))
    error_message = "project_id must be a Google Cloud project id (6-30 lowercase letters, digits and hyphens)."
  }
}

variable "region" {
  type        = string
  description = "Region of Cloud Run, the functions, Artifact Registry and the uploads bucket."
  default     = "us-central1"

  validation {
    condition     = can(regex("^[a-z]+-[a-z]+[0-9]+$", var.region))
    error_message = "region must be a Google Cloud region such as us-central1 or europe-west1."
  }
}

variable "environment" {
  type        = string
  description = "Name of this environment, used in labels and in the Terraform state prefix."
  default     = "prod"

  validation {
    condition     = contains(["dev", "staging", "prod"], var.environment)
    error_message = "environment must be one of dev, staging, prod."
  }
}

variable "labels" {
  type        = map(string)
  description = "Extra labels put on every resource that takes labels."
  default     = {}
}

variable "deletion_protection" {
  type        = bool
  description = "Protect the Cloud Run service, the Firestore database and the uploads bucket from deletion. `python -m deploy destroy` turns it off first."
  default     = true
}

# -- Firestore ---------------------------------------------------------------
variable "firestore_location" {
  type        = string
  description = "Location of the Firestore database, on the region's continent: nam5 (multi-region) or the region itself for a us-* region, eur3 or the region for a europe-* region, the region otherwise. null (the default) picks nam5, eur3 or the region. Cannot change after creation (a later change is ignored)."
  default     = null

  # Same continent as Cloud Run and the functions: every transaction crosses
  # the distance between them. (Terraform >= 1.9: a rule may name another variable.)
  validation {
    condition = contains(
      startswith(var.region, "us-") ? ["nam5", var.region] : startswith(var.region, "europe-") ? ["eur3", var.region] : [var.region],
      coalesce(var.firestore_location, var.region)
    )
    error_message = "firestore_location must fit region: nam5 or the region itself for a us-* region, eur3 or the region itself for a europe-* region, the region itself otherwise (or leave it null)."
  }
}

variable "firestore_database" {
  type        = string
  description = "Firestore database id (FIRESTORE_DATABASE)."
  default     = "(default)"

  validation {
    condition     = var.firestore_database == "(default)" || can(regex("^[a-z][a-z0-9-]{2,61}[a-z0-9]$", var.firestore_database))
    error_message = "firestore_database must be (default) or a database id of 4-63 lowercase letters, digits and hyphens."
  }
}

# -- socket service (Cloud Run) ----------------------------------------------
variable "image" {
  type        = string
  description = "Container image of the socket service, preferably by digest (REGION-docker.pkg.dev/PROJECT/chat/socket-service@sha256:...). `python -m deploy` and cloudbuild.yaml pass the digest they just pushed."

  validation {
    condition     = can(regex("^[a-z0-9.-]+(:[0-9]+)?/[a-z0-9._/-]+(@sha256:[0-9a-f]{64}|:[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})$", var.image))
    error_message = "image must be a full image reference with a tag or, better, an @sha256 digest."
  }
}

variable "socket_min_instances" {
  type        = number
  description = "Minimum Cloud Run instances of the socket service (1 keeps WebSocket connects warm; 0 allows scale to zero)."
  default     = 1

  validation {
    condition     = var.socket_min_instances >= 0 && var.socket_min_instances <= 100
    error_message = "socket_min_instances must be between 0 and 100."
  }
}

variable "socket_max_instances" {
  type        = number
  description = "Maximum Cloud Run instances of the socket service."
  default     = 20

  validation {
    condition     = var.socket_max_instances >= 1 && var.socket_max_instances <= 1000
    error_message = "socket_max_instances must be between 1 and 1000."
  }
}

variable "socket_concurrency" {
  type        = number
  description = "Concurrent requests (open WebSocket connections) per socket-service instance; Cloud Run allows at most 1000."
  default     = 1000

  validation {
    condition     = var.socket_concurrency >= 1 && var.socket_concurrency <= 1000
    error_message = "socket_concurrency must be between 1 and 1000."
  }
}

variable "socket_cpu" {
  type        = string
  description = "vCPUs of each socket-service instance."
  default     = "1"

  validation {
    condition     = contains(["1", "2", "4"], var.socket_cpu)
    error_message = "socket_cpu must be one of 1, 2, 4."
  }
}

variable "socket_memory" {
  type        = string
  description = "Memory of each socket-service instance (about 31 KB per idle connection was measured, see DESIGN.md)."
  default     = "1Gi"

  validation {
    condition     = can(regex("^[0-9]+(Mi|Gi)$", var.socket_memory))
    error_message = "socket_memory must look like 512Mi or 1Gi."
  }
}

variable "cors_allowed_origins" {
  type        = list(string)
  description = "Extra browser origins (e.g. a custom domain) allowed by the socket service, request_upload and the uploads bucket. The socket service's own run.app URL is always allowed."
  default     = []

  validation {
    condition     = alltrue([for o in var.cors_allowed_origins : can(regex(local.https_origin_pattern, o))])
    error_message = "Each origin must be https://host[:port], without a path, a trailing slash or a wildcard."
  }
}

variable "frame_ancestors" {
  type        = list(string)
  description = "Origins allowed to frame the chat page (an application that embeds it and hands it a token with postMessage). Empty: framing is refused (frame-ancestors 'none')."
  default     = []

  validation {
    condition     = alltrue([for o in var.frame_ancestors : can(regex(local.https_origin_pattern, o))])
    error_message = "Each origin must be https://host[:port], without a path, a trailing slash or a wildcard."
  }
}

variable "log_level" {
  type        = string
  description = "LOG_LEVEL of every deployable."
  default     = "info"

  validation {
    condition     = contains(["debug", "info", "warning", "error"], var.log_level)
    error_message = "log_level must be one of debug, info, warning, error."
  }
}

# -- authentication (JWT_*) --------------------------------------------------
variable "jwt_algorithms" {
  type        = list(string)
  description = "JWT_ALGORITHMS allow-list. With an HS* algorithm the shared secret comes from Secret Manager (secret chat-jwt-secret); with RS*/ES* set jwt_jwks_url or jwt_public_key."
  default     = ["HS256"]

  validation {
    condition = length(var.jwt_algorithms) > 0 && alltrue([for a in var.jwt_algorithms : contains(
      ["HS256", "HS384", "HS512", "RS256", "RS384", "RS512", "ES256", "ES384", "ES512", "PS256", "PS384", "PS512"], a
    )])
    error_message = "jwt_algorithms must name at least one of HS256/384/512, RS256/384/512, ES256/384/512, PS256/384/512."
  }
}

variable "jwt_jwks_url" {
  type        = string
  description = "JWT_JWKS_URL for RS*/ES* tokens, e.g. Identity Platform: https://www.googleapis.com/service_accounts/v1/jwk/securetoken@system.gserviceaccount.com (that key set signs every Firebase project's tokens, so jwt_issuer and jwt_audience are required with it)."
  default     = ""
}

variable "jwt_public_key" {
  type        = string
  description = "JWT_PUBLIC_KEY (PEM) for RS*/ES* tokens, when no JWKS URL is used."
  default     = ""
}

# Every deployable runs with CHAT_ENV=production, which refuses public keys
# without both claims checked: a key set such as Google's securetoken JWKS
# signs the tokens of every Firebase project, with any `sub`.
variable "jwt_issuer" {
  type        = string
  description = "JWT_ISSUER: required `iss` claim (e.g. https://securetoken.google.com/PROJECT for Identity Platform). Required with jwt_jwks_url or jwt_public_key; with a shared secret alone, empty means not checked."
  default     = ""

  validation {
    condition     = var.jwt_issuer != "" || !local.jwt_public_key_configured
    error_message = "jwt_issuer is required with jwt_jwks_url or jwt_public_key: a public key set may sign other projects' tokens too (Google's securetoken JWKS signs every Firebase project's)."
  }
}

variable "jwt_audience" {
  type        = string
  description = "JWT_AUDIENCE: required `aud` claim (e.g. the project id for Identity Platform). Required with jwt_jwks_url or jwt_public_key; with a shared secret alone, empty means not checked."
  default     = ""

  validation {
    condition     = var.jwt_audience != "" || !local.jwt_public_key_configured
    error_message = "jwt_audience is required with jwt_jwks_url or jwt_public_key: a public key set may sign other projects' tokens too (Google's securetoken JWKS signs every Firebase project's)."
  }
}

variable "jwt_leeway_seconds" {
  type        = number
  description = "JWT_LEEWAY_SECONDS: clock skew allowed; null keeps the application default."
  default     = null

  validation {
    condition     = var.jwt_leeway_seconds == null || (coalesce(var.jwt_leeway_seconds, 0) >= 0 && coalesce(var.jwt_leeway_seconds, 0) <= 60)
    error_message = "jwt_leeway_seconds must be between 0 and 60."
  }
}

# -- messages, uploads and limits (shared by the deployables) ----------------
variable "max_message_chars" {
  type        = number
  description = "MAX_MESSAGE_CHARS of the socket service and of upload captions; null keeps the application default."
  default     = null
}

variable "max_upload_bytes" {
  type        = number
  description = "MAX_UPLOAD_BYTES: enforced by the upload functions and advertised by the socket service; null keeps the application default."
  default     = null
}

variable "allowed_content_types" {
  type        = list(string)
  description = "ALLOWED_CONTENT_TYPES: upload allow-list, enforced and advertised; empty keeps the application default."
  default     = []
}

variable "uploads_per_window" {
  type        = number
  description = "UPLOADS_PER_WINDOW per user; null keeps the application default."
  default     = null
}

variable "upload_window_seconds" {
  type        = number
  description = "UPLOAD_WINDOW_SECONDS; null keeps the application default."
  default     = null
}

variable "upload_url_ttl_seconds" {
  type        = number
  description = "UPLOAD_URL_TTL_SECONDS: lifetime of signed PUT URLs (60-3600, and below the pending-upload TTL of topology.json); null keeps the application default."
  default     = null

  validation {
    condition     = var.upload_url_ttl_seconds == null || (coalesce(var.upload_url_ttl_seconds, 60) >= 60 && coalesce(var.upload_url_ttl_seconds, 60) <= 3600)
    error_message = "upload_url_ttl_seconds must be between 60 and 3600."
  }
}

variable "ai_max_concurrent_per_user" {
  type        = number
  description = "AI_MAX_CONCURRENT_PER_USER; null keeps the application default."
  default     = null
}

variable "ai_messages_per_window" {
  type        = number
  description = "AI_MESSAGES_PER_WINDOW; null keeps the application default."
  default     = null
}

variable "ai_window_seconds" {
  type        = number
  description = "AI_WINDOW_SECONDS; null keeps the application default."
  default     = null
}

# -- AI replies (ai_stream) --------------------------------------------------
variable "ai_provider" {
  type        = string
  description = "AI_PROVIDER: gemini (Vertex AI with the function's service account), openai (any OpenAI-compatible endpoint) or offline (a labelled local stand-in, no model)."
  default     = "gemini"

  validation {
    condition     = contains(["offline", "gemini", "openai"], var.ai_provider)
    error_message = "ai_provider must be one of offline, gemini, openai."
  }
}

variable "ai_max_reply_seconds" {
  type        = number
  description = "AI_MAX_REPLY_SECONDS, given to the socket service and ai_stream alike; must stay below the ack deadline of the ai-requests push subscription (topology.json)."
  default     = 300

  validation {
    condition     = var.ai_max_reply_seconds >= 5
    error_message = "ai_max_reply_seconds must be at least 5."
  }
}

variable "ai_system_prompt" {
  type        = string
  description = "AI_SYSTEM_PROMPT; empty keeps the application default."
  default     = ""
}

variable "ai_max_output_tokens" {
  type        = number
  description = "AI_MAX_OUTPUT_TOKENS; null keeps the application default."
  default     = null
}

variable "provider_timeout_seconds" {
  type        = number
  description = "PROVIDER_TIMEOUT_SECONDS; null keeps the application default."
  default     = null
}

variable "gemini_model" {
  type        = string
  description = "GEMINI_MODEL; empty keeps the application default."
  default     = ""
}

variable "gemini_location" {
  type        = string
  description = "GEMINI_LOCATION: Vertex AI location of the model; empty keeps the application default."
  default     = ""
}

variable "gemini_api_key_secret" {
  type        = string
  description = "Secret Manager secret id holding a Gemini API key (GEMINI_API_KEY); empty uses Vertex AI with the function's service account."
  default     = ""
}

variable "openai_base_url" {
  type        = string
  description = "OPENAI_BASE_URL of an OpenAI-compatible endpoint; empty keeps the application default."
  default     = ""
}

variable "openai_model" {
  type        = string
  description = "OPENAI_MODEL; empty keeps the application default."
  default     = ""
}

variable "openai_organization" {
  type        = string
  description = "OPENAI_ORGANIZATION, sent as OpenAI-Organization; empty sends none."
  default     = ""
}

variable "openai_max_tokens_field" {
  type        = string
  description = "OPENAI_MAX_TOKENS_FIELD: max_tokens, or max_completion_tokens for OpenAI reasoning models."
  default     = "max_tokens"

  validation {
    condition     = contains(["max_tokens", "max_completion_tokens"], var.openai_max_tokens_field)
    error_message = "openai_max_tokens_field must be max_tokens or max_completion_tokens."
  }
}

variable "openai_api_key_secret" {
  type        = string
  description = "Secret Manager secret id holding the OpenAI-compatible API key (OPENAI_API_KEY); empty sends none."
  default     = ""
}

# -- functions ---------------------------------------------------------------
variable "ai_stream_concurrency" {
  type        = number
  description = "Replies streamed at once by one ai_stream instance (request concurrency and THREADS)."
  default     = 64

  validation {
    condition     = var.ai_stream_concurrency >= 1 && var.ai_stream_concurrency <= 1000
    error_message = "ai_stream_concurrency must be between 1 and 1000."
  }
}

variable "ai_stream_max_instances" {
  type        = number
  description = "Maximum instances of ai_stream."
  default     = 20
}

variable "ai_stream_min_instances" {
  type        = number
  description = "Minimum instances of ai_stream kept warm (0 = scale to zero). 1 spares the first reply after an idle period a cold start, at the price of one idle 1 vCPU / 1 GiB instance all month (docs/DEPLOY.md, step 3)."
  default     = 0

  validation {
    condition     = var.ai_stream_min_instances >= 0 && var.ai_stream_min_instances <= var.ai_stream_max_instances
    error_message = "ai_stream_min_instances must be between 0 and ai_stream_max_instances."
  }
}

variable "upload_concurrency" {
  type        = number
  description = "Concurrent requests per instance of each upload function (request concurrency and THREADS)."
  default     = 16

  validation {
    condition     = var.upload_concurrency >= 1 && var.upload_concurrency <= 1000
    error_message = "upload_concurrency must be between 1 and 1000."
  }
}

variable "upload_max_instances" {
  type        = number
  description = "Maximum instances of each upload function."
  default     = 20
}

variable "push_function_ingress" {
  type        = string
  description = "Ingress of the functions fed by push subscriptions. Pub/Sub push from the same project counts as internal traffic; ALLOW_ALL still requires the push service account's OIDC token."
  default     = "ALLOW_INTERNAL_ONLY"

  validation {
    condition     = contains(["ALLOW_INTERNAL_ONLY", "ALLOW_ALL"], var.push_function_ingress)
    error_message = "push_function_ingress must be ALLOW_INTERNAL_ONLY or ALLOW_ALL."
  }
}

# -- public access and IAM ---------------------------------------------------
variable "public_access" {
  type        = string
  description = "How browsers reach the socket service and request_upload (both check the JWT themselves): invoker_iam_disabled turns Cloud Run's invoker IAM check off (works under domain-restricted sharing; refused where constraints/run.managed.requireInvokerIam is enforced); allUsers grants roles/run.invoker to allUsers (refused under domain-restricted sharing)."
  default     = "invoker_iam_disabled"

  validation {
    condition     = contains(["invoker_iam_disabled", "allUsers"], var.public_access)
    error_message = "public_access must be invoker_iam_disabled or allUsers."
  }
}

variable "iam_settle_seconds" {
  type        = number
  description = "Seconds to wait after new IAM grants before what needs them is built or started (IAM changes take typically 2 minutes, sometimes 7 or more, to take effect). Only waited when grants are created or change."
  default     = 90

  validation {
    condition     = var.iam_settle_seconds >= 0 && var.iam_settle_seconds <= 600
    error_message = "iam_settle_seconds must be between 0 and 600."
  }
}

# -- alerts ------------------------------------------------------------------
variable "alert_emails" {
  type        = list(string)
  description = "E-mail addresses notified by the alert policies (dead letters, stuck replies)."
  default     = []

  validation {
    condition     = alltrue([for e in var.alert_emails : can(regex("^[^@\\s]+@[^@\\s]+$", e))])
    error_message = "alert_emails must be e-mail addresses."
  }
}

# -- cost and endpoint limits (security review, issue 13) ---------------------
variable "upload_retention_days" {
  type        = number
  description = "Uploaded files older than this many days are deleted by the uploads bucket's lifecycle rule; the upload functions count each user's storage quota over the same days (UPLOAD_RETENTION_DAYS)."
  default     = 90

  validation {
    condition     = var.upload_retention_days >= 1
    error_message = "upload_retention_days must be at least 1."
  }
}

variable "upload_user_quota_bytes" {
  type        = number
  description = "UPLOAD_USER_QUOTA_BYTES: bytes one user's files may take over the retention period (0 = no quota); null keeps the application default (1 GiB)."
  default     = null

  validation {
    condition     = var.upload_user_quota_bytes == null || coalesce(var.upload_user_quota_bytes, 0) >= 0
    error_message = "upload_user_quota_bytes must be 0 or more."
  }
}

variable "ai_global_tokens_per_hour" {
  type        = number
  description = "AI_GLOBAL_TOKENS_PER_HOUR: estimated model tokens all replies together may use per hour; once spent, new replies end at once with `unavailable` until the hour rolls (0 = no budget); null keeps the application default (0)."
  default     = null

  validation {
    condition     = var.ai_global_tokens_per_hour == null || coalesce(var.ai_global_tokens_per_hour, 0) >= 0
    error_message = "ai_global_tokens_per_hour must be 0 or more."
  }
}

variable "openai_allowed_hosts" {
  type        = list(string)
  description = "OPENAI_ALLOWED_HOSTS: the hosts OPENAI_BASE_URL may name (https only, enforced when CHAT_ENV=production); empty keeps the application default (api.openai.com)."
  default     = []
}
