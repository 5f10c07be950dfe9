# Topics and subscriptions, all named by chatcore/topology.json.
#
# chat-events (the instances' room bus) and chat-events-functions (the
# functions' emits to rooms) have no static subscription: each socket-service
# instance creates one on each at start-up (ordering on, an expiration policy,
# on chat-events a filter that drops its own messages) and deletes them on
# SIGTERM; see iam.tf for the permissions that takes, and for who may publish
# on which (only the socket service on chat-events, only the functions on
# chat-events-functions). ai-requests and gcs-uploads feed the
# functions through push subscriptions defined here (not Eventarc triggers,
# whose subscriptions Terraform cannot configure), exactly as the local stack
# does with the emulator (devstack/stack.py).

resource "google_pubsub_topic" "topics" {
  #checkov:skip=CKV_GCP_83:Google-managed encryption is accepted for chat events, AI requests and storage notifications; messages hold ids and short texts already stored in Firestore under the same default encryption. Add kms_key_name per topic if a CMEK policy applies.
  for_each = toset(values(local.topology.topics))

  project = var.project_id
  name    = each.value
  labels  = local.labels

  depends_on = [google_project_service.apis]
}

# Push subscriptions: OIDC-authenticated push to the function's URL. The path
# /projects/<project>/topics/<topic> is appended so that functions-framework
# builds the CloudEvent `source` naming the topic, as it does locally.
resource "google_pubsub_subscription" "push" {
  for_each = local.push_subscriptions

  project = var.project_id
  name    = each.value.name
  topic   = google_pubsub_topic.topics[each.value.topic].id
  labels  = local.labels

  # Longer than the longest reply: the function answers the push only when
  # the reply has ended (AI_MAX_REPLY_SECONDS < ack deadline, checked in functions.tf).
  ack_deadline_seconds       = each.value.ack_deadline_seconds
  message_retention_duration = "604800s"

  push_config {
    push_endpoint = "${local.push_functions[each.value.target].service_config[0].uri}/projects/${var.project_id}/topics/${each.value.topic}"

    oidc_token {
      service_account_email = google_service_account.push_invoker.email
      audience              = local.push_functions[each.value.target].service_config[0].uri
    }
  }

  retry_policy {
    minimum_backoff = "10s"
    maximum_backoff = "600s"
  }

  dead_letter_policy {
    dead_letter_topic     = google_pubsub_topic.topics[each.value.dead_letter_topic].id
    max_delivery_attempts = each.value.max_delivery_attempts
  }

  # Never expire for inactivity (the default is 31 days without deliveries).
  expiration_policy {
    ttl = ""
  }

  depends_on = [
    google_cloud_run_v2_service_iam_member.push_invoker,
    google_service_account_iam_member.pubsub_agent_token_creator,
  ]
}

# Each dead-letter topic has a pull subscription, so a message that exhausted
# its delivery attempts is kept (7 days) for inspection and replay, and the
# alert in monitoring.tf fires.
resource "google_pubsub_subscription" "dead_letter" {
  for_each = local.pull_subscriptions

  project = var.project_id
  name    = each.value.name
  topic   = google_pubsub_topic.topics[each.value.topic].id
  labels  = local.labels

  ack_deadline_seconds       = 60
  message_retention_duration = "604800s"
  retain_acked_messages      = false

  expiration_policy {
    ttl = ""
  }
}

# The Pub/Sub service agent forwards undeliverable messages: it needs
# publisher on each dead-letter topic and subscriber on each source
# subscription. It also mints the push OIDC tokens (needed in projects
# created before April 2021, harmless after).
resource "google_project_service_identity" "pubsub" {
  provider = google-beta

  project = var.project_id
  service = "pubsub.googleapis.com"

  depends_on = [google_project_service.apis]
}

resource "google_pubsub_topic_iam_member" "dead_letter_publisher" {
  for_each = local.dead_letter_topics

  project = var.project_id
  topic   = google_pubsub_topic.topics[each.value].name
  role    = "roles/pubsub.publisher"
  member  = "serviceAccount:${google_project_service_identity.pubsub.email}"
}

resource "google_pubsub_subscription_iam_member" "dead_letter_source_subscriber" {
  for_each = local.push_subscriptions

  project      = var.project_id
  subscription = google_pubsub_subscription.push[each.key].name
  role         = "roles/pubsub.subscriber"
  member       = "serviceAccount:${google_project_service_identity.pubsub.email}"
}

resource "google_service_account_iam_member" "pubsub_agent_token_creator" {
  service_account_id = google_service_account.push_invoker.name
  role               = "roles/iam.serviceAccountTokenCreator"
  member             = "serviceAccount:${google_project_service_identity.pubsub.email}"
}
