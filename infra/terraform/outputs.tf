output "chat_url" {
  description = "URL of the chat: the socket service's deterministic run.app URL (also the origin allowed by CORS)."
  value       = local.socket_service_url
}

output "service_url" {
  description = "URL of the socket service as reported by Cloud Run."
  value       = google_cloud_run_v2_service.socket.uri
}

output "upload_url" {
  description = "Endpoint of request_upload (the socket service advertises it as upload_url in /config.json)."
  value       = google_cloudfunctions2_function.functions["request_upload"].url
}

output "uploads_bucket" {
  description = "Name of the uploads bucket."
  value       = google_storage_bucket.uploads.name
}

output "image" {
  description = "Image the socket service runs (the rollback reference: see docs/DEPLOY.md)."
  value       = var.image
}

output "artifact_registry" {
  description = "Docker repository for the socket service's image."
  value       = "${google_artifact_registry_repository.chat.location}-docker.pkg.dev/${var.project_id}/${google_artifact_registry_repository.chat.repository_id}"
}

output "jwt_secret" {
  description = "Secret Manager secret holding the HS* token secret (docs/DEPLOY.md: creating a user token)."
  value       = google_secret_manager_secret.jwt.secret_id
}

output "invoker_check_disabled_services" {
  description = "Cloud Run services of gen2 functions whose invoker IAM check `python -m deploy apply` turns off after each apply (google_cloudfunctions2_function has no argument for it); empty with public_access = \"allUsers\"."
  value       = var.public_access == "invoker_iam_disabled" ? [google_cloudfunctions2_function.functions["request_upload"].name] : []
}

output "dead_letter_subscriptions" {
  description = "Pull subscriptions of the dead-letter topics, to inspect failed messages."
  value       = [for s in google_pubsub_subscription.dead_letter : s.name]
}
