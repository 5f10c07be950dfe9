# One service account per deployable, each with only the roles it needs, on
# the narrowest resource that works. No primitive roles (owner/editor/viewer).
#
#   socket service  chat-socket   Firestore; publish chat-events (the only account
#                                 that may) and ai-requests; its own per-instance
#                                 subscriptions on chat-events and chat-events-functions;
#                                 read/delete uploads (signed downloads, conversation
#                                 deletion), sign URLs as itself; JWT secret
#   upload functions chat-upload  Firestore; publish chat-events-functions only;
#                                 write/read/delete uploads, sign URLs as itself; JWT secret
#   ai_stream       chat-ai       Firestore; publish chat-events-functions only; read
#                                 uploads; Vertex AI; model API key secrets if configured
#   push-invoker    chat-push     invoke the two push-fed functions (OIDC identity
#                                 of the push subscriptions), nothing else
#   builds          chat-fn-build builds the functions' images and the socket service's
#                                 image (Cloud Build, as a user-specified build account)

resource "google_service_account" "socket" {
  project      = var.project_id
  account_id   = "chat-socket"
  display_name = "Chat socket service (Cloud Run)"
}

resource "google_service_account" "upload" {
  project      = var.project_id
  account_id   = "chat-upload"
  display_name = "Chat upload functions (request_upload, on_upload_finalized)"
}

resource "google_service_account" "ai_stream" {
  project      = var.project_id
  account_id   = "chat-ai"
  display_name = "Chat AI reply function (ai_stream)"
}

resource "google_service_account" "push_invoker" {
  project      = var.project_id
  account_id   = "chat-push"
  display_name = "Pub/Sub push subscriptions to the chat functions"
}

resource "google_service_account" "functions_build" {
  project      = var.project_id
  account_id   = "chat-fn-build"
  display_name = "Builds of the chat functions and of the socket service image"

  # Bootstrapped with the APIs (deploy/settings.py BOOTSTRAP_TARGETS): the IAM API first.
  depends_on = [google_project_service.apis]
}

# -- Pub/Sub: publishing is granted per topic. --------------------------------
# The room bus trusts a topic as far as these grants go (chatcore/bus/policy.py):
# socket-service instances obey every manager command (disconnect, enter_room,
# close_room, any emit) found on chat-events, so only the socket service may
# publish there. The functions publish their emits on chat-events-functions,
# from which the instances obey only the emits the functions make. A stolen
# function credential can then emit a reply or file event to a room, and
# nothing more.
resource "google_pubsub_topic_iam_member" "publishers" {
  for_each = {
    "socket-chat-events"        = { topic = local.topology.topics.chat_events, member = google_service_account.socket.member }
    "socket-ai-requests"        = { topic = local.topology.topics.ai_requests, member = google_service_account.socket.member }
    "upload-function-events"    = { topic = local.topology.topics.function_events, member = google_service_account.upload.member }
    "ai-stream-function-events" = { topic = local.topology.topics.function_events, member = google_service_account.ai_stream.member }
  }

  project = var.project_id
  topic   = google_pubsub_topic.topics[each.value.topic].name
  role    = "roles/pubsub.publisher"
  member  = each.value.member
}

# The socket service's per-instance subscriptions on chat-events and chat-events-functions.
#
# Each instance creates `chat-events-instance-<host id>` and
# `chat-events-functions-instance-<host id>` at start-up, pulls from them, and
# deletes them on SIGTERM (packages/socketio-pubsub-gcp/src/socketio_pubsub_gcp/pubsub_transport.py). Creating a
# subscription takes pubsub.subscriptions.create on the project plus
# pubsub.topics.attachSubscription on the topic; pulling and deleting take
# consume and delete on the subscription, whose name is not known before it
# exists, so those are granted on the project too.
#
# roles/pubsub.editor would also allow creating, changing and deleting topics
# and snapshots, seeking, and changing any subscription's configuration. So:
#   - roles/pubsub.subscriber on the chat-events and chat-events-functions
#     TOPICS only: the topic-level permission it grants is
#     topics.attachSubscription, so the service can attach subscriptions to
#     those two topics and to no other;
#   - roles/pubsub.viewer on the chat-events topic: topics.get, used by /readyz;
#   - a custom project role with exactly subscriptions.create, .get, .consume
#     and .delete (no update, no topic or snapshot permissions), granted on the
#     project (google_project_iam_member.runtime, below).
# What remains broader than ideal: list/consume/delete apply to every
# subscription of the project (including the push and dead-letter ones). IAM
# conditions on resource.name are not available for Pub/Sub
# (https://cloud.google.com/iam/docs/conditions-resource-attributes lists the
# services that recognise resource attributes; pubsub.googleapis.com is not
# one of them: such a condition never matches), so a name-prefix condition
# cannot narrow them; a dedicated project, or an IAM deny policy on the
# static subscriptions, would.
resource "google_project_iam_custom_role" "instance_subscriptions" {
  project     = var.project_id
  role_id     = "chatInstanceSubscriptions"
  title       = "Chat socket service: its own room-bus subscriptions"
  description = "Create, read, list, pull from and delete the per-instance subscriptions of the socket service (attaching them needs topics.attachSubscription, granted on chat-events and chat-events-functions only)."
  # list: at start-up an instance deletes the subscriptions of instances that
  # died without their SIGTERM (the 24 h expiration policy would, later).
  permissions = [
    "pubsub.subscriptions.consume",
    "pubsub.subscriptions.create",
    "pubsub.subscriptions.delete",
    "pubsub.subscriptions.get",
    "pubsub.subscriptions.list",
  ]
}

# subscriber on the two room-bus topics (attaching the per-instance
# subscriptions), viewer on chat-events (topics.get, for /readyz).
resource "google_pubsub_topic_iam_member" "socket_bus" {
  for_each = {
    attach_chat_events     = { topic = local.topology.topics.chat_events, role = "roles/pubsub.subscriber" }
    attach_function_events = { topic = local.topology.topics.function_events, role = "roles/pubsub.subscriber" }
    view_chat_events       = { topic = local.topology.topics.chat_events, role = "roles/pubsub.viewer" }
  }

  project = var.project_id
  topic   = google_pubsub_topic.topics[each.value.topic].name
  role    = each.value.role
  member  = google_service_account.socket.member
}

# -- Cloud Storage: on the uploads bucket only. --------------------------------
# A V4 signed URL acts with its signer's permissions: the upload functions'
# PUT URLs need create, the socket service's download URLs need get; the
# socket service deletes a conversation's objects; on_upload_finalized reads
# and deletes refused objects; ai_stream reads files for the prompt.
#
# The socket service only reads and deletes: it signs GET URLs (objects.get),
# and deleting a conversation lists its prefix and deletes each object
# (objects.list, objects.delete; chatcore/uploads.delete_conversation_objects).
# It never creates or overwrites an object, so it gets objectViewer plus a
# custom role with objects.delete alone (no predefined role grants delete
# without create), not objectUser.
resource "google_project_iam_custom_role" "uploads_object_delete" {
  project     = var.project_id
  role_id     = "chatUploadsObjectDelete"
  title       = "Chat socket service: delete uploaded files"
  description = "Delete objects of the uploads bucket (granted on that bucket only), for conversation deletion; reading comes from roles/storage.objectViewer."
  permissions = ["storage.objects.delete"]
}

resource "google_storage_bucket_iam_member" "uploads" {
  for_each = {
    socket        = { role = "roles/storage.objectViewer", member = google_service_account.socket.member }
    socket_delete = { role = google_project_iam_custom_role.uploads_object_delete.name, member = google_service_account.socket.member }
    upload        = { role = "roles/storage.objectUser", member = google_service_account.upload.member }
    ai_stream     = { role = "roles/storage.objectViewer", member = google_service_account.ai_stream.member }
  }

  bucket = google_storage_bucket.uploads.name
  role   = each.value.role
  member = each.value.member
}

# Keyless URL signing: the runtime account signs through the IAM Credentials
# signBlob API as itself (chatcore/identity/signing.py), so it needs Token Creator on
# its own account, and on no other.
resource "google_service_account_iam_member" "self_sign" {
  for_each = {
    socket = google_service_account.socket
    upload = google_service_account.upload
  }

  service_account_id = each.value.name
  role               = "roles/iam.serviceAccountTokenCreator"
  member             = each.value.member
}

# -- Project-level roles of the runtime accounts. -----------------------------
resource "google_project_iam_member" "runtime" {
  for_each = {
    # Firestore: no finer role than datastore.user exists for data access.
    socket_firestore    = { role = "roles/datastore.user", member = google_service_account.socket.member }
    upload_firestore    = { role = "roles/datastore.user", member = google_service_account.upload.member }
    ai_stream_firestore = { role = "roles/datastore.user", member = google_service_account.ai_stream.member }
    # The socket service's per-instance subscriptions (custom role instance_subscriptions, above).
    socket_instance_subscriptions = { role = google_project_iam_custom_role.instance_subscriptions.name, member = google_service_account.socket.member }
    # Vertex AI for the gemini provider.
    ai_stream_vertex = { role = "roles/aiplatform.user", member = google_service_account.ai_stream.member }
  }

  project = var.project_id
  role    = each.value.role
  member  = each.value.member
}

# -- Builds (Cloud Build with a dedicated account). ----------------------------
# chat-fn-build builds the functions (build_config.service_account) and the
# socket service's image (`python -m deploy apply`, gcloud builds submit
# --service-account, logs to Cloud Logging only, source staged under
# cloudbuild/ in the function sources bucket). These grants and the account are
# bootstrapped before the image build (deploy/settings.py BOOTSTRAP_TARGETS).
resource "google_project_iam_member" "functions_build_logs" {
  project = var.project_id
  role    = "roles/logging.logWriter"
  member  = google_service_account.functions_build.member
}

resource "google_artifact_registry_repository_iam_member" "functions_build_push" {
  project    = var.project_id
  location   = google_artifact_registry_repository.chat.location
  repository = google_artifact_registry_repository.chat.name
  role       = "roles/artifactregistry.writer"
  member     = google_service_account.functions_build.member
}

resource "google_storage_bucket_iam_member" "functions_build_sources" {
  bucket = google_storage_bucket.function_sources.name
  role   = "roles/storage.objectViewer"
  member = google_service_account.functions_build.member
}

# A gen2 function's build does not read our sources bucket: Cloud Functions
# copies the archive into Google's bucket gcf-v2-sources-<project number>-<region>
# and the build fetches it from there, as this account ("Access to bucket
# gcf-v2-sources-... denied. You must grant Storage Object Viewer permission to
# ..." otherwise). That bucket is created by the first function deploy, so no
# bucket-level grant can precede it: the grant is on the project, limited to
# that bucket (and its objects) by an IAM condition on resource.name, which
# Cloud Storage supports.
resource "google_project_iam_member" "functions_build_gcf_sources" {
  project = var.project_id
  role    = "roles/storage.objectViewer"
  member  = google_service_account.functions_build.member

  condition {
    title       = "gcf-v2-sources bucket only"
    description = "Read the function sources Cloud Functions copies to gcf-v2-sources-<project number>-<region>."
    expression  = "resource.name.startsWith(\"projects/_/buckets/gcf-v2-sources-${data.google_project.this.number}-${var.region}\")"
  }
}

# -- Invoking the functions. --------------------------------------------------
# 2nd-gen functions are Cloud Run services: invocation is run.invoker on the
# service. The push-fed ones accept only the push subscriptions' account;
# request_upload is public (browsers call it; it checks the JWT itself), like
# the socket service. How they are public is var.public_access:
#   invoker_iam_disabled (default): Cloud Run's invoker IAM check is off
#     (invoker_iam_disabled on the socket service, run.tf; on request-upload, a
#     gen2 function without that argument, `python -m deploy apply` runs
#     `gcloud run services update request-upload --no-invoker-iam-check` after
#     every apply and reads it back). Works under domain-restricted sharing;
#     refused where constraints/run.managed.requireInvokerIam is enforced.
#   allUsers: roles/run.invoker for allUsers, below. Refused under
#     domain-restricted sharing (iam.allowedPolicyMemberDomains, enforced by
#     default in organizations created since May 3, 2024): "One or more users
#     named in the policy do not belong to a permitted customer."
resource "google_cloud_run_v2_service_iam_member" "push_invoker" {
  for_each = local.push_functions

  project  = var.project_id
  location = var.region
  name     = each.value.name
  role     = "roles/run.invoker"
  member   = google_service_account.push_invoker.member
}

# Public on purpose, in the allUsers mode only: browsers call both from the
# chat page; every Socket.IO connection, API call and upload request is
# authenticated in code by its JWT (chatcore.identity.auth), and CORS names
# only our origins.
resource "google_cloud_run_v2_service_iam_member" "public" {
  for_each = var.public_access == "allUsers" ? {
    request_upload = { location = var.region, name = google_cloudfunctions2_function.functions["request_upload"].name }
    socket         = { location = google_cloud_run_v2_service.socket.location, name = google_cloud_run_v2_service.socket.name }
  } : {}

  project  = var.project_id
  location = each.value.location
  name     = each.value.name
  role     = "roles/run.invoker"
  member   = "allUsers"
}

# -- Waiting for new grants to take effect. -----------------------------------
# IAM changes take effect eventually: "typically 2 minutes, potentially 7
# minutes or longer" (https://cloud.google.com/iam/docs/access-change-propagation).
# A function build or a revision started seconds after its grants fails
# (e.g. "Access to bucket gcf-v2-sources-... denied"). Each terraform_data
# below sleeps once when the grants it lists are created or change
# (triggers_replace), not on every apply; what runs with those grants
# depends on it. No provider beyond Terraform's own (local-exec needs `sh` and
# `sleep`: Cloud Shell, Linux, macOS, the Cloud Build images of cloudbuild.yaml).
# Grants made on the deployables themselves (the push subscriptions' invoker,
# the allUsers mode) cannot precede them; Pub/Sub retries pushes meanwhile.

# The build account's grants: bootstrapped (deploy/settings.py) before the
# socket service's image is built, and before any function build.
resource "terraform_data" "build_iam_settle" {
  triggers_replace = {
    logs        = google_project_iam_member.functions_build_logs.id
    registry    = google_artifact_registry_repository_iam_member.functions_build_push.id
    sources     = google_storage_bucket_iam_member.functions_build_sources.id
    gcf_sources = google_project_iam_member.functions_build_gcf_sources.id
  }

  provisioner "local-exec" {
    command = "echo 'New IAM grants for the build account: waiting ${var.iam_settle_seconds} s for them to take effect (docs/DEPLOY.md)'; sleep ${var.iam_settle_seconds}"
  }
}

# The runtime accounts' grants: before the socket service and the functions start.
resource "terraform_data" "iam_settle" {
  triggers_replace = {
    # The project-level grants under the keys and in the order they had as separate
    # resources: the same value, so a state made before they became one for_each does not sleep again.
    firestore_user                = [for k, g in google_project_iam_member.runtime : g.id if endswith(k, "_firestore")]
    socket_instance_subscriptions = google_project_iam_member.runtime["socket_instance_subscriptions"].id
    ai_stream_vertex              = google_project_iam_member.runtime["ai_stream_vertex"].id
    publishers                    = [for g in google_pubsub_topic_iam_member.publishers : g.id]
    socket_bus                    = [for g in google_pubsub_topic_iam_member.socket_bus : g.id]
    uploads                       = [for g in google_storage_bucket_iam_member.uploads : g.id]
    self_sign                     = [for g in google_service_account_iam_member.self_sign : g.id]
    jwt_reader                    = [for g in google_secret_manager_secret_iam_member.jwt_reader : g.id]
    model_key_reader              = [for g in google_secret_manager_secret_iam_member.model_key_reader : g.id]
    storage_agent_publisher       = google_pubsub_topic_iam_member.storage_agent_publisher.id
    dead_letter_publisher         = [for g in google_pubsub_topic_iam_member.dead_letter_publisher : g.id]
    pubsub_agent_token_creator    = google_service_account_iam_member.pubsub_agent_token_creator.id
  }

  provisioner "local-exec" {
    command = "echo 'New IAM grants: waiting ${var.iam_settle_seconds} s for them to take effect (docs/DEPLOY.md)'; sleep ${var.iam_settle_seconds}"
  }
}
