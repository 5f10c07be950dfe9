# The functions (Cloud Run functions, 2nd gen): request_upload (public HTTP,
# CORS in code), on_upload_finalized and ai_stream (HTTP, invoked only by the
# push subscriptions of pubsub.tf).
#
# Sources: `python -m deploy package` stages each function folder with a copy
# of the shared package chatcore next to main.py (what DESIGN.md calls "the
# build copies it into each function's source bundle") in .build/functions/;
# here each staged folder is zipped and uploaded under its content hash, so a
# change of code is a new object and a new function revision.

locals {
  function_build_dir = "${path.module}/.build/functions"

  # Environment of the upload functions (functions/upload/uploads/settings.py);
  # both targets read the same settings.
  upload_env = {
    CHAT_ENV                   = "production"
    GOOGLE_CLOUD_PROJECT       = var.project_id
    FIRESTORE_DATABASE         = google_firestore_database.main.name
    LOG_LEVEL                  = var.log_level
    JWT_ALGORITHMS             = local.auth_env_values.JWT_ALGORITHMS
    CORS_ALLOWED_ORIGINS       = join(",", local.cors_origins)
    UPLOAD_BUCKET              = google_storage_bucket.uploads.name
    UPLOAD_PENDING_TTL_SECONDS = local.uploads_layout.pending_ttl_seconds
    SIGNING_SERVICE_ACCOUNT    = google_service_account.upload.email
    # The storage quota counts the days the bucket keeps (storage.tf).
    UPLOAD_RETENTION_DAYS = var.upload_retention_days
    # functions-framework (gunicorn) threads = requests served at once.
    THREADS = var.upload_concurrency
  }
  # Tunables: left out when null or empty (application default).
  upload_optional_env = {
    JWT_PUBLIC_KEY         = local.auth_env_values.JWT_PUBLIC_KEY
    JWT_JWKS_URL           = local.auth_env_values.JWT_JWKS_URL
    JWT_ISSUER             = local.auth_env_values.JWT_ISSUER
    JWT_AUDIENCE           = local.auth_env_values.JWT_AUDIENCE
    JWT_LEEWAY_SECONDS     = local.auth_env_values.JWT_LEEWAY_SECONDS
    UPLOAD_URL_TTL_SECONDS = var.upload_url_ttl_seconds
    MAX_UPLOAD_BYTES       = var.max_upload_bytes
    ALLOWED_CONTENT_TYPES  = join(",", var.allowed_content_types)
    MAX_MESSAGE_CHARS      = var.max_message_chars
    UPLOADS_PER_WINDOW     = var.uploads_per_window
    UPLOAD_WINDOW_SECONDS  = var.upload_window_seconds
    # Storage one user's files may take over the retention period.
    UPLOAD_USER_QUOTA_BYTES = var.upload_user_quota_bytes
  }
  upload_environment = { for k, v in merge(local.upload_env, {
    for name, value in local.upload_optional_env : name => value if value != null && value != ""
  }) : k => tostring(v) }
  upload_secret_env = {
    JWT_SECRET = google_secret_manager_secret.jwt.secret_id
  }

  # Environment of ai_stream (functions/ai_stream/aistream/settings.py).
  ai_stream_env = {
    CHAT_ENV             = "production"
    GOOGLE_CLOUD_PROJECT = var.project_id
    FIRESTORE_DATABASE   = google_firestore_database.main.name
    LOG_LEVEL            = var.log_level
    AI_PROVIDER          = var.ai_provider
    AI_MAX_REPLY_SECONDS = var.ai_max_reply_seconds
    # Vertex AI with the function's own account unless an API key is given.
    GEMINI_USE_VERTEXAI     = var.gemini_api_key_secret == "" ? "1" : "0"
    OPENAI_MAX_TOKENS_FIELD = var.openai_max_tokens_field
    UPLOAD_BUCKET           = google_storage_bucket.uploads.name
    THREADS                 = var.ai_stream_concurrency
  }
  # Tunables: left out when null or empty (application default).
  ai_stream_optional_env = {
    AI_SYSTEM_PROMPT         = var.ai_system_prompt
    AI_MAX_OUTPUT_TOKENS     = var.ai_max_output_tokens
    PROVIDER_TIMEOUT_SECONDS = var.provider_timeout_seconds
    GEMINI_MODEL             = var.gemini_model
    GEMINI_LOCATION          = var.gemini_location
    OPENAI_BASE_URL          = var.openai_base_url
    OPENAI_MODEL             = var.openai_model
    # Hosts OPENAI_BASE_URL may name in production; the budget of all replies together.
    OPENAI_ALLOWED_HOSTS      = join(",", var.openai_allowed_hosts)
    AI_GLOBAL_TOKENS_PER_HOUR = var.ai_global_tokens_per_hour
  }
  ai_stream_environment = { for k, v in merge(local.ai_stream_env, {
    for name, value in local.ai_stream_optional_env : name => value if value != null && value != ""
  }) : k => tostring(v) }
  ai_stream_secret_env = {
    OPENAI_API_KEY = var.openai_api_key_secret
    GEMINI_API_KEY = var.gemini_api_key_secret
  }

  # The functions fed by push subscriptions, by functions-framework target
  # (topology.json push_subscriptions[].target).
  push_functions = {
    ai_stream           = google_cloudfunctions2_function.ai_stream
    on_upload_finalized = google_cloudfunctions2_function.on_upload_finalized
  }
}

# -- sources ------------------------------------------------------------------
data "archive_file" "upload" {
  type        = "zip"
  source_dir  = "${local.function_build_dir}/upload"
  output_path = "${path.module}/.build/upload.zip"
}

data "archive_file" "ai_stream" {
  type        = "zip"
  source_dir  = "${local.function_build_dir}/ai_stream"
  output_path = "${path.module}/.build/ai_stream.zip"
}

resource "google_storage_bucket_object" "upload_source" {
  bucket = google_storage_bucket.function_sources.name
  name   = "upload-${data.archive_file.upload.output_md5}.zip"
  source = data.archive_file.upload.output_path
}

resource "google_storage_bucket_object" "ai_stream_source" {
  bucket = google_storage_bucket.function_sources.name
  name   = "ai_stream-${data.archive_file.ai_stream.output_md5}.zip"
  source = data.archive_file.ai_stream.output_path
}

# -- request_upload (public HTTP) ---------------------------------------------
resource "google_cloudfunctions2_function" "request_upload" {
  #checkov:skip=CKV_GCP_124:request_upload is called by browsers over the internet, so ingress must be ALLOW_ALL; every request must carry a valid JWT (checked in code) and CORS names only the chat's origins.
  project     = var.project_id
  location    = var.region
  name        = "request-upload"
  description = "Answers a V4 signed PUT URL for one file (functions/upload, target request_upload)."
  labels      = local.labels

  build_config {
    runtime           = "python311"
    entry_point       = "request_upload"
    service_account   = google_service_account.functions_build.id
    docker_repository = google_artifact_registry_repository.chat.id
    source {
      storage_source {
        bucket = google_storage_bucket.function_sources.name
        object = google_storage_bucket_object.upload_source.name
      }
    }
  }

  service_config {
    service_account_email            = google_service_account.upload.email
    ingress_settings                 = "ALLOW_ALL"
    all_traffic_on_latest_revision   = true
    available_cpu                    = "1"
    available_memory                 = "512Mi"
    max_instance_request_concurrency = var.upload_concurrency
    max_instance_count               = var.upload_max_instances
    timeout_seconds                  = 60
    environment_variables            = local.upload_environment

    dynamic "secret_environment_variables" {
      for_each = local.jwt_uses_hmac ? local.upload_secret_env : {}
      content {
        key        = secret_environment_variables.key
        project_id = var.project_id
        secret     = secret_environment_variables.value
        version    = "latest"
      }
    }
  }

  depends_on = [
    google_project_service.apis,
    google_secret_manager_secret_iam_member.jwt_reader,
    google_project_iam_member.functions_build_logs,
    google_artifact_registry_repository_iam_member.functions_build_push,
    google_storage_bucket_iam_member.functions_build_sources,
  ]
}

# -- on_upload_finalized (push subscription on gcs-uploads) --------------------
resource "google_cloudfunctions2_function" "on_upload_finalized" {
  project     = var.project_id
  location    = var.region
  name        = "on-upload-finalized"
  description = "Checks a finalized upload and posts it to the room (functions/upload, target on_upload_finalized)."
  labels      = local.labels

  build_config {
    runtime           = "python311"
    entry_point       = "on_upload_finalized"
    service_account   = google_service_account.functions_build.id
    docker_repository = google_artifact_registry_repository.chat.id
    source {
      storage_source {
        bucket = google_storage_bucket.function_sources.name
        object = google_storage_bucket_object.upload_source.name
      }
    }
  }

  service_config {
    service_account_email            = google_service_account.upload.email
    ingress_settings                 = var.push_function_ingress
    all_traffic_on_latest_revision   = true
    available_cpu                    = "1"
    available_memory                 = "512Mi"
    max_instance_request_concurrency = var.upload_concurrency
    max_instance_count               = var.upload_max_instances
    # As long as Pub/Sub waits for the push to be answered.
    timeout_seconds       = local.push_by_target["on_upload_finalized"].ack_deadline_seconds
    environment_variables = local.upload_environment

    dynamic "secret_environment_variables" {
      for_each = local.jwt_uses_hmac ? local.upload_secret_env : {}
      content {
        key        = secret_environment_variables.key
        project_id = var.project_id
        secret     = secret_environment_variables.value
        version    = "latest"
      }
    }
  }

  depends_on = [
    google_project_service.apis,
    google_secret_manager_secret_iam_member.jwt_reader,
    google_project_iam_member.functions_build_logs,
    google_artifact_registry_repository_iam_member.functions_build_push,
    google_storage_bucket_iam_member.functions_build_sources,
    # Its emits go to chat-events-functions (iam.tf): granted before it runs.
    google_pubsub_topic_iam_member.publishers,
  ]
}

# -- ai_stream (push subscription on ai-requests) ------------------------------
resource "google_cloudfunctions2_function" "ai_stream" {
  project     = var.project_id
  location    = var.region
  name        = "ai-stream"
  description = "Streams one AI reply to its room (functions/ai_stream, target ai_stream)."
  labels      = local.labels

  build_config {
    runtime           = "python311"
    entry_point       = "ai_stream"
    service_account   = google_service_account.functions_build.id
    docker_repository = google_artifact_registry_repository.chat.id
    source {
      storage_source {
        bucket = google_storage_bucket.function_sources.name
        object = google_storage_bucket_object.ai_stream_source.name
      }
    }
  }

  service_config {
    service_account_email            = google_service_account.ai_stream.email
    ingress_settings                 = var.push_function_ingress
    all_traffic_on_latest_revision   = true
    available_cpu                    = "1"
    available_memory                 = "1Gi"
    max_instance_request_concurrency = var.ai_stream_concurrency
    max_instance_count               = var.ai_stream_max_instances
    # The push is answered when the reply has ended: as long as Pub/Sub waits.
    timeout_seconds       = local.push_by_target["ai_stream"].ack_deadline_seconds
    environment_variables = local.ai_stream_environment

    dynamic "secret_environment_variables" {
      for_each = { for k, v in local.ai_stream_secret_env : k => v if v != "" }
      content {
        key        = secret_environment_variables.key
        project_id = var.project_id
        secret     = secret_environment_variables.value
        version    = "latest"
      }
    }
  }

  lifecycle {
    precondition {
      condition     = var.ai_max_reply_seconds < local.push_by_target["ai_stream"].ack_deadline_seconds
      error_message = "ai_max_reply_seconds must stay below the ack deadline of the ai-requests push subscription (chatcore/topology.json), or Pub/Sub redelivers replies still streaming."
    }
  }

  depends_on = [
    google_project_service.apis,
    google_secret_manager_secret_iam_member.model_key_reader,
    google_project_iam_member.functions_build_logs,
    google_artifact_registry_repository_iam_member.functions_build_push,
    google_storage_bucket_iam_member.functions_build_sources,
    # Its emits go to chat-events-functions (iam.tf): granted before it runs.
    google_pubsub_topic_iam_member.publishers,
  ]
}
