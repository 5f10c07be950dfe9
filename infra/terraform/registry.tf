# Artifact Registry: the socket service's image (pushed by cloudbuild.yaml or
# `python -m deploy apply`) and the functions' build images.

resource "google_artifact_registry_repository" "chat" {
  #checkov:skip=CKV_GCP_84:Google-managed encryption for container images built from this public repository's code; set kms_key_name if a CMEK policy applies.
  project       = var.project_id
  location      = var.region
  repository_id = "chat"
  format        = "DOCKER"
  description   = "Images of the chat backend (socket service, functions)."
  labels        = local.labels

  # Keep enough recent images to roll back to (docs/DEPLOY.md), drop the rest.
  cleanup_policies {
    id     = "keep-recent"
    action = "KEEP"
    most_recent_versions {
      keep_count = 20
    }
  }
  cleanup_policies {
    id     = "delete-old"
    action = "DELETE"
    condition {
      tag_state  = "ANY"
      older_than = "7776000s"
    }
  }

  depends_on = [google_project_service.apis]
}
