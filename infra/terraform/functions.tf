# The functions (Cloud Run functions, 2nd gen): request_upload (public HTTP,
# CORS in code), on_upload_finalized and ai_stream (HTTP, invoked only by the
# push subscriptions of pubsub.tf).
#
# Sources: `python -m deploy package` stages each function folder with a copy
# of the shared package chatcore next to main.py (what DESIGN.md calls "the
# build copies it into each function's source bundle") and the room bus
# library's wheel, listed in its requirements.txt, in .build/functions/;
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
    # Regional Pub/Sub endpoint (ordering keys are ordered within one region).
    PUBSUB_REGION = var.region
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
    PUBSUB_REGION           = var.region
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
    OPENAI_ORGANIZATION      = var.openai_organization
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

  # The three functions, by functions-framework target (= entry point); one
  # google_cloudfunctions2_function each. `source` names the staged folder
  # (.build/functions/<source>, python -m deploy package).
  functions = {
    request_upload = {
      name            = "request-upload"
      description     = "Answers a V4 signed PUT URL for one file (functions/upload, target request_upload)."
      source          = "upload"
      service_account = google_service_account.upload.email
      # Public: browsers call it (iam.tf, public_access); every request carries a JWT checked in code.
      ingress       = "ALLOW_ALL"
      memory        = "512Mi"
      concurrency   = var.upload_concurrency
      max_instances = var.upload_max_instances
      min_instances = null
      timeout       = 60
      environment   = local.upload_environment
      secret_env    = local.jwt_uses_hmac ? local.upload_secret_env : {}
    }
    on_upload_finalized = {
      name            = "on-upload-finalized"
      description     = "Checks a finalized upload and posts it to the room (functions/upload, target on_upload_finalized)."
      source          = "upload"
      service_account = google_service_account.upload.email
      ingress         = var.push_function_ingress
      memory          = "512Mi"
      concurrency     = var.upload_concurrency
      max_instances   = var.upload_max_instances
      min_instances   = null
      # As long as Pub/Sub waits for the push to be answered.
      timeout     = local.push_by_target["on_upload_finalized"].ack_deadline_seconds
      environment = local.upload_environment
      secret_env  = local.jwt_uses_hmac ? local.upload_secret_env : {}
    }
    ai_stream = {
      name            = "ai-stream"
      description     = "Streams one AI reply to its room (functions/ai_stream, target ai_stream)."
      source          = "ai_stream"
      service_account = google_service_account.ai_stream.email
      ingress         = var.push_function_ingress
      memory          = "1Gi"
      concurrency     = var.ai_stream_concurrency
      max_instances   = var.ai_stream_max_instances
      # 0 by default; 1 spares the first reply after idle a cold start (cost: docs/DEPLOY.md).
      min_instances = var.ai_stream_min_instances
      # The push is answered when the reply has ended: as long as Pub/Sub waits.
      timeout     = local.push_by_target["ai_stream"].ack_deadline_seconds
      environment = local.ai_stream_environment
      secret_env  = { for k, v in local.ai_stream_secret_env : k => v if v != "" }
    }
  }
  # Each staged source folder, zipped once whatever the number of functions built from it.
  function_sources = toset([for f in local.functions : f.source])

  # The functions fed by push subscriptions, by functions-framework target
  # (topology.json push_subscriptions[].target).
  push_functions = { for target in keys(local.push_by_target) : target => google_cloudfunctions2_function.functions[target] }
}

# -- sources ------------------------------------------------------------------
data "archive_file" "function_source" {
  for_each = local.function_sources

  type        = "zip"
  source_dir  = "${local.function_build_dir}/${each.key}"
  output_path = "${path.module}/.build/${each.key}.zip"
}

resource "google_storage_bucket_object" "function_source" {
  for_each = local.function_sources

  bucket = google_storage_bucket.function_sources.name
  name   = "${each.key}-${data.archive_file.function_source[each.key].output_md5}.zip"
  source = data.archive_file.function_source[each.key].output_path
}

# -- the functions --------------------------------------------------------------
# request_upload: public HTTP (CORS in code). on_upload_finalized: push
# subscription on gcs-uploads. ai_stream: push subscription on ai-requests.
resource "google_cloudfunctions2_function" "functions" {
  #checkov:skip=CKV_GCP_124:request_upload is called by browsers over the internet, so its ingress must be ALLOW_ALL; every request must carry a valid JWT (checked in code) and CORS names only the chat's origins. The push-fed functions take var.push_function_ingress (internal only by default).
  for_each = local.functions

  project     = var.project_id
  location    = var.region
  name        = each.value.name
  description = each.value.description
  labels      = local.labels

  build_config {
    runtime           = "python311"
    entry_point       = each.key
    service_account   = google_service_account.functions_build.id
    docker_repository = google_artifact_registry_repository.chat.id
    source {
      storage_source {
        bucket = google_storage_bucket.function_sources.name
        object = google_storage_bucket_object.function_source[each.value.source].name
      }
    }
  }

  service_config {
    service_account_email            = each.value.service_account
    ingress_settings                 = each.value.ingress
    all_traffic_on_latest_revision   = true
    available_cpu                    = "1"
    available_memory                 = each.value.memory
    max_instance_request_concurrency = each.value.concurrency
    max_instance_count               = each.value.max_instances
    min_instance_count               = each.value.min_instances
    timeout_seconds                  = each.value.timeout
    environment_variables            = each.value.environment

    dynamic "secret_environment_variables" {
      for_each = each.value.secret_env
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
      condition     = each.key != "ai_stream" || var.ai_max_reply_seconds < local.push_by_target["ai_stream"].ack_deadline_seconds
      error_message = "ai_max_reply_seconds must stay below the ack deadline of the ai-requests push subscription (chatcore/topology.json), or Pub/Sub redelivers replies still streaming."
    }
  }

  depends_on = [
    google_project_service.apis,
    google_secret_manager_secret_iam_member.jwt_reader,
    google_secret_manager_secret_iam_member.model_key_reader,
    google_project_iam_member.functions_build_logs,
    google_artifact_registry_repository_iam_member.functions_build_push,
    google_storage_bucket_iam_member.functions_build_sources,
    google_project_iam_member.functions_build_gcf_sources,
    # New grants take effect eventually (iam.tf): wait for them once.
    terraform_data.build_iam_settle,
    terraform_data.iam_settle,
    # The push-fed functions emit to chat-events-functions (iam.tf): granted before they run.
    google_pubsub_topic_iam_member.publishers,
  ]
}

# Addresses before the functions became one for_each (existing deployments keep their resources).
moved {
  from = google_cloudfunctions2_function.request_upload
  to   = google_cloudfunctions2_function.functions["request_upload"]
}

moved {
  from = google_cloudfunctions2_function.on_upload_finalized
  to   = google_cloudfunctions2_function.functions["on_upload_finalized"]
}

moved {
  from = google_cloudfunctions2_function.ai_stream
  to   = google_cloudfunctions2_function.functions["ai_stream"]
}

moved {
  from = google_storage_bucket_object.upload_source
  to   = google_storage_bucket_object.function_source["upload"]
}

moved {
  from = google_storage_bucket_object.ai_stream_source
  to   = google_storage_bucket_object.function_source["ai_stream"]
}
