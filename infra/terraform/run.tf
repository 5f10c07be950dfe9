# The socket service on Cloud Run, with WebSocket-friendly settings.

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

      # Its environment variables (environment.tf), then the secret ones, by
      # Secret Manager secret id.
      dynamic "env" {
        for_each = local.socket_service_environment
        content {
          name  = env.key
          value = env.value
        }
      }

      dynamic "env" {
        for_each = local.jwt_uses_hmac ? local.token_secret_env : {}
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
    google_project_iam_member.runtime,
    google_pubsub_topic_iam_member.socket_bus,
    # ...and those grants have had time to take effect (iam.tf).
    terraform_data.iam_settle,
  ]
}
