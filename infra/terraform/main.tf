# The serverless chat on Google Cloud: the socket service on Cloud Run, the
# ai_stream and upload functions (2nd gen), fed by Pub/Sub push subscriptions
# of our own, Firestore and the uploads bucket. Resources are split by concern:
# pubsub.tf, storage.tf, firestore.tf, secrets.tf, registry.tf, run.tf,
# functions.tf, environment.tf (the deployables' environment variables),
# iam.tf, monitoring.tf; moved.tf keeps the former addresses of resources.

# user_project_override + billing_project: every API call names this project as
# its quota project. The Firebase Rules API (firestore.tf) refuses user
# credentials from `gcloud auth application-default login` without one ("Your
# application has authenticated using end user credentials ... which are not
# supported by the firebaserules.googleapis.com"); the caller then needs
# serviceusage.services.use on the project (Owner, or roles/serviceusage.serviceUsageAdmin).
provider "google" {
  project               = var.project_id
  region                = var.region
  user_project_override = true
  billing_project       = var.project_id
}

provider "google-beta" {
  project               = var.project_id
  region                = var.region
  user_project_override = true
  billing_project       = var.project_id
}

locals {
  # THE one definition of every topic, subscription and bucket name, shared
  # with the local stack (chatcore/topology.py). Never retype a name here.
  topology = jsondecode(file("${path.module}/../../chatcore/topology.json"))

  push_subscriptions = { for s in local.topology.push_subscriptions : s.name => s }
  pull_subscriptions = { for s in local.topology.pull_subscriptions : s.name => s }
  # The push subscription feeding each functions-framework target.
  push_by_target = { for s in local.topology.push_subscriptions : s.target => s }
  # Dead-letter topics, each with a subscription (pull_subscriptions) so that
  # nothing is silently lost.
  dead_letter_topics = toset([for s in local.topology.push_subscriptions : s.dead_letter_topic])

  # Bucket names are global: the topology's name, prefixed by the (globally
  # unique) project id. Every deployable gets it through UPLOAD_BUCKET.
  uploads_bucket_name = "${var.project_id}-${local.topology.buckets.uploads}"
  sources_bucket_name = "${var.project_id}-chat-function-sources"
  uploads_layout      = local.topology.uploads

  socket_service_name = "socket-service"
  # Cloud Run's deterministic URL (https://SERVICE-PROJECT_NUMBER.REGION.run.app):
  # known before the service exists, so the functions and the bucket can allow
  # the chat page's origin without a dependency cycle (the service needs the
  # upload function's URL).
  socket_service_url = "https://${local.socket_service_name}-${data.google_project.this.number}.${var.region}.run.app"
  cors_origins       = distinct(concat([local.socket_service_url], var.cors_allowed_origins))

  jwt_uses_hmac = length([for a in var.jwt_algorithms : a if startswith(a, "HS")]) > 0

  labels = merge({ app = "chat", environment = var.environment }, var.labels)
}

data "google_project" "this" {
  project_id = var.project_id
}

# -- APIs --------------------------------------------------------------------
locals {
  apis = toset([
    "aiplatform.googleapis.com",
    "artifactregistry.googleapis.com",
    "cloudbuild.googleapis.com",
    "cloudfunctions.googleapis.com",
    "cloudresourcemanager.googleapis.com",
    "firebaserules.googleapis.com",
    "firestore.googleapis.com",
    "iam.googleapis.com",
    "iamcredentials.googleapis.com",
    "logging.googleapis.com",
    "monitoring.googleapis.com",
    "pubsub.googleapis.com",
    "run.googleapis.com",
    "secretmanager.googleapis.com",
    "storage.googleapis.com",
  ])
}

resource "google_project_service" "apis" {
  for_each = local.apis

  project = var.project_id
  service = each.value
  # Turning an API off on destroy would break anything else in the project.
  disable_on_destroy         = false
  disable_dependent_services = false
}
