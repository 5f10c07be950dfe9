# The socket service on Cloud Run, with WebSocket-friendly settings.

locals {
  # Environment of the socket service (socket_service/settings.py).
  socket_service_env = {
    CHAT_ENV             = "production"
    GOOGLE_CLOUD_PROJECT = var.project_id
    FIRESTORE_DATABASE   = google_firestore_database.main.name
    LOG_LEVEL            = var.log_level
    JWT_ALGORITHMS       = local.auth_env_values.JWT_ALGORITHMS
    # Never in production (the service refuses to start with it anyway).
    DEV_TOKENS = "0"
    # Browsers send Origin on the WebSocket handshake too, so the page's own
    # origin must be listed.
    CORS_ALLOWED_ORIGINS    = join(",", local.cors_origins)
    UPLOAD_URL              = google_cloudfunctions2_function.functions["request_upload"].url
    UPLOAD_BUCKET           = google_storage_bucket.uploads.name
    SIGNING_SERVICE_ACCOUNT = google_service_account.socket.email
    AI_PROVIDER             = var.ai_provider
    AI_MAX_REPLY_SECONDS    = var.ai_max_reply_seconds
    # Publish through the regional endpoint: Pub/Sub orders an ordering key
    # only among publishes made in one region.
    PUBSUB_REGION = var.region
  }
  # Tunables: left out when null or empty, so the application default applies
  # (only variables here, so which ones are set is known at plan time).
  socket_service_optional_env = {
    JWT_PUBLIC_KEY             = local.auth_env_values.JWT_PUBLIC_KEY
    JWT_JWKS_URL               = local.auth_env_values.JWT_JWKS_URL
    JWT_ISSUER                 = local.auth_env_values.JWT_ISSUER
    JWT_AUDIENCE               = local.auth_env_values.JWT_AUDIENCE
    JWT_LEEWAY_SECONDS         = local.auth_env_values.JWT_LEEWAY_SECONDS
    MAX_MESSAGE_CHARS          = var.max_message_chars
    MAX_UPLOAD_BYTES           = var.max_upload_bytes
    ALLOWED_CONTENT_TYPES      = join(",", var.allowed_content_types)
    AI_MAX_CONCURRENT_PER_USER = var.ai_max_concurrent_per_user
    AI_MESSAGES_PER_WINDOW     = var.ai_messages_per_window
    AI_WINDOW_SECONDS          = var.ai_window_seconds
    # Empty: nobody may frame the chat (frame-ancestors 'none').
    FRAME_ANCESTORS = join(",", var.frame_ancestors)
  }
  socket_service_environment = { for k, v in merge(local.socket_service_env, {
    for name, value in local.socket_service_optional_env : name => value if value != null && value != ""
  }) : k => tostring(v) }
  # Secret Manager secret id of each secret variable.
  socket_service_secret_env = {
    JWT_SECRET = google_secret_manager_secret.jwt.secret_id
  }
}

resource "google_cloud_run_v2_service" "socket" {
  project             = var.project_id
  name                = local.socket_service_name
  location            = var.region
  ingress             = "INGRESS_TRAFFIC_ALL"
  deletion_protection = var.deletion_protection
  labels              = local.labels
  # Public without an allUsers binding (refused under domain-restricted
  # sharing): every connection and API call checks its JWT (iam.tf, public_access).
  invoker_iam_disabled = var.public_access == "invoker_iam_disabled"

  template {
    service_account       = google_service_account.socket.email
    execution_environment = "EXECUTION_ENVIRONMENT_GEN2"
    # A WebSocket is one long request: allow the longest Cloud Run permits;
    # clients reconnect (and resume gap-free) when it ends.
    timeout = "3600s"
    # Long-polling needs sticky sessions; WebSocket reconnects land on the
    # same instance when it is still there.
    session_affinity                 = true
    max_instance_request_concurrency = var.socket_concurrency

    scaling {
      min_instance_count = var.socket_min_instances
      max_instance_count = var.socket_max_instances
    }

    containers {
      image = var.image

      # Cloud Run sets PORT to this; the service reads PORT (CHAT_PORT unset).
      ports {
        container_port = 8080
      }

      resources {
        limits = {
          cpu    = var.socket_cpu
          memory = var.socket_memory
        }
        # CPU always allocated: the instance's subscriptions on chat-events and
        # chat-events-functions keep pulling between requests, and the
        # stale-reply sweeper runs.
        cpu_idle          = false
        startup_cpu_boost = true
      }

      dynamic "env" {
        for_each = local.socket_service_environment
        content {
          name  = env.key
          value = env.value
        }
      }

      dynamic "env" {
        for_each = local.jwt_uses_hmac ? local.socket_service_secret_env : {}
        content {
          name = env.key
          value_source {
            secret_key_ref {
              secret  = env.value
              version = "latest"
            }
          }
        }
      }

      # /health, not /healthz: Cloud Run's frontend reserves some paths ending
      # in z (a Google 404 page from outside; the local stack keeps /healthz).
      startup_probe {
        http_get {
          path = "/health"
        }
        period_seconds    = 2
        timeout_seconds   = 2
        failure_threshold = 30
      }

      liveness_probe {
        http_get {
          path = "/health"
        }
        period_seconds    = 30
        timeout_seconds   = 5
        failure_threshold = 3
      }
    }
  }

  traffic {
    type    = "TRAFFIC_TARGET_ALLOCATION_TYPE_LATEST"
    percent = 100
  }

  depends_on = [
    google_project_service.apis,
    google_secret_manager_secret_iam_member.jwt_reader,
    google_project_iam_member.socket_instance_subscriptions,
    google_pubsub_topic_iam_member.socket_bus,
    # ...and those grants have had time to take effect (iam.tf).
    terraform_data.iam_settle,
  ]
}
