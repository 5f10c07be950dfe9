# The uploads bucket (browsers PUT straight to it with V4 signed URLs) and the
# bucket holding the functions' source archives.

locals {
  # Request headers a browser sends on the signed PUT (chatcore/identity/signing.py):
  # CORS must allow exactly these. tests/infra checks them against the local
  # stack's fake-gcs-server flags (devstack/stack.py GCS_CORS_HEADERS).
  uploads_cors_headers = [
    "content-type",
    "x-goog-content-length-range",
    "x-goog-if-generation-match",
    "x-goog-meta-upload-id",
  ]
}

resource "google_storage_bucket" "uploads" {
  #checkov:skip=CKV_GCP_62:Access is audited with Cloud Audit Logs (Data Access logs for storage.googleapis.com can be enabled per project); legacy usage-log buckets add a second copy of every object name.
  #checkov:skip=CKV_GCP_78:No versioning on purpose: on_upload_finalized deletes refused objects (wrong type, too large, hostile) and that deletion must be final; uploads are write-once (x-goog-if-generation-match: 0) and the soft-delete policy below still allows recovery of deleted objects by an administrator.
  project  = var.project_id
  name     = local.uploads_bucket_name
  location = upper(var.region)
  labels   = local.labels

  uniform_bucket_level_access = true
  public_access_prevention    = "enforced"
  force_destroy               = !var.deletion_protection

  # Browsers PUT the file and GET signed download URLs from the chat page's
  # origins only; no other methods, no other origins.
  cors {
    origin          = local.cors_origins
    method          = ["PUT", "GET"]
    response_header = local.uploads_cors_headers
    max_age_seconds = 3600
  }

  # A signed PUT is atomic, so an abandoned upload leaves no object; its
  # pending Firestore record expires through the TTL field (firestore.tf).
  # Multipart uploads that were started and never finished are removed here.
  lifecycle_rule {
    condition {
      age = local.uploads_layout.incomplete_upload_max_age_days
    }
    action {
      type = "AbortIncompleteMultipartUpload"
    }
  }

  # Uploads are not kept for ever: files older than the retention period go
  # (their messages stay, naming the file). The upload functions count each
  # user's storage quota over the same days (UPLOAD_RETENTION_DAYS).
  lifecycle_rule {
    condition {
      age            = var.upload_retention_days
      matches_prefix = ["${local.uploads_layout.object_prefix}/"]
    }
    action {
      type = "Delete"
    }
  }

  soft_delete_policy {
    retention_duration_seconds = 604800
  }

  depends_on = [google_project_service.apis]
}

# OBJECT_FINALIZE notifications, in the JSON API format on-upload-finalized
# reads, to the gcs-uploads topic; only for objects under the uploads prefix.
resource "google_storage_notification" "uploads_finalized" {
  bucket             = google_storage_bucket.uploads.name
  payload_format     = "JSON_API_V1"
  topic              = google_pubsub_topic.topics[local.topology.topics.gcs_uploads].id
  event_types        = ["OBJECT_FINALIZE"]
  object_name_prefix = "${local.uploads_layout.object_prefix}/"

  depends_on = [google_pubsub_topic_iam_member.storage_agent_publisher]
}

# The Cloud Storage service agent publishes the notifications.
data "google_storage_project_service_account" "gcs" {
  project = var.project_id

  depends_on = [google_project_service.apis]
}

resource "google_pubsub_topic_iam_member" "storage_agent_publisher" {
  project = var.project_id
  topic   = google_pubsub_topic.topics[local.topology.topics.gcs_uploads].name
  role    = "roles/pubsub.publisher"
  member  = "serviceAccount:${data.google_storage_project_service_account.gcs.email_address}"
}

# Source archives of the functions (python -m deploy package stages them).
resource "google_storage_bucket" "function_sources" {
  #checkov:skip=CKV_GCP_62:Holds only build inputs written by Terraform; access is audited with Cloud Audit Logs.
  #checkov:skip=CKV_GCP_78:Objects are named by content hash and written once by Terraform; versioning would only keep copies of identical archives.
  project  = var.project_id
  name     = local.sources_bucket_name
  location = upper(var.region)
  labels   = local.labels

  uniform_bucket_level_access = true
  public_access_prevention    = "enforced"
  force_destroy               = true

  # `python -m deploy apply` stages the socket service's build source under
  # cloudbuild/ (gcloud builds submit --gcs-source-staging-dir); a build reads
  # it once.
  lifecycle_rule {
    condition {
      age            = 7
      matches_prefix = ["cloudbuild/"]
    }
    action {
      type = "Delete"
    }
  }

  depends_on = [google_project_service.apis]
}
