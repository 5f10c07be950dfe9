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

  # What the two targets of functions/upload share: their source folder,
  # service account, sizing and environment (environment.tf).
  upload_function = {
    source          = "upload"
    service_account = google_service_account.upload.email
    memory          = "512Mi"
    concurrency     = var.upload_concurrency
    max_instances   = var.upload_max_instances
    min_instances   = null
    environment     = local.upload_environment
    secret_env      = local.jwt_uses_hmac ? local.token_secret_env : {}
  }

  # The three functions, by functions-framework target (= entry point); one
  # google_cloudfunctions2_function each. `source` names the staged folder
  # (.build/functions/<source>, python -m deploy package).
  functions = {
    request_upload = merge(local.upload_function, {
      name        = "request-upload"
      description = "Answers a V4 signed PUT URL for one file (functions/upload, target request_upload)."
      # Public: browsers call it (iam.tf, public_access); every request carries a JWT checked in code.
      ingress = "ALLOW_ALL"
      timeout = 60
    })
    on_upload_finalized = merge(local.upload_function, {
      name        = "on-upload-finalized"
      description = "Checks a finalized upload and posts it to the room (functions/upload, target on_upload_finalized)."
      ingress     = var.push_function_ingress
      # As long as Pub/Sub waits for the push to be answered.
      timeout = local.push_by_target["on_upload_finalized"].ack_deadline_seconds
    })
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
