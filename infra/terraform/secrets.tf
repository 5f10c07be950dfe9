# The HS* token secret. Terraform creates the secret but never its value (a
# value here would sit in the state): `python -m deploy apply` adds a random
# first version when there is none, or add your own (docs/DEPLOY.md).

resource "google_secret_manager_secret" "jwt" {
  project   = var.project_id
  secret_id = "chat-jwt-secret"
  labels    = local.labels

  replication {
    auto {}
  }

  depends_on = [google_project_service.apis]
}

# Who reads which secret: the JWT secret by the deployables that verify
# tokens (only when an HS* algorithm is allowed), the model API keys by
# ai_stream (only when configured; those secrets are created by hand).
locals {
  jwt_secret_readers = local.jwt_uses_hmac ? {
    socket = google_service_account.socket.member
    upload = google_service_account.upload.member
  } : {}
  model_key_secrets = toset(compact([var.openai_api_key_secret, var.gemini_api_key_secret]))
}

resource "google_secret_manager_secret_iam_member" "jwt_reader" {
  for_each = local.jwt_secret_readers

  project   = var.project_id
  secret_id = google_secret_manager_secret.jwt.secret_id
  role      = "roles/secretmanager.secretAccessor"
  member    = each.value
}

resource "google_secret_manager_secret_iam_member" "model_key_reader" {
  for_each = local.model_key_secrets

  project   = var.project_id
  secret_id = each.value
  role      = "roles/secretmanager.secretAccessor"
  member    = google_service_account.ai_stream.member
}
