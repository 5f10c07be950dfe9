# Former addresses of resources that became one for_each (or were renamed).
#
# A `moved` block tells Terraform that what the state holds under `from` is now
# `to`: the plan of an existing deployment moves it in the state instead of
# destroying it and creating it again (a new deployment ignores these blocks).
# Keep them: a deployment last applied before the change still needs them.
# Kept in this one file, by change, so that each resource's own file shows
# only what is deployed today. tests/infra (test_terraform_module.py) checks
# that every `to` is an instance that exists and every `from` is gone.

# -- functions.tf: the three functions, one for_each keyed by target, and their
#    source objects, keyed by source folder.
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

# -- iam.tf: the socket service's three grants on the room-bus topics.
moved {
  from = google_pubsub_topic_iam_member.socket_attach_chat_events
  to   = google_pubsub_topic_iam_member.socket_bus["attach_chat_events"]
}

moved {
  from = google_pubsub_topic_iam_member.socket_attach_function_events
  to   = google_pubsub_topic_iam_member.socket_bus["attach_function_events"]
}

moved {
  from = google_pubsub_topic_iam_member.socket_view_chat_events
  to   = google_pubsub_topic_iam_member.socket_bus["view_chat_events"]
}

# -- iam.tf: the runtime accounts' project-level roles, one for_each.
moved {
  from = google_project_iam_member.firestore_user["socket"]
  to   = google_project_iam_member.runtime["socket_firestore"]
}

moved {
  from = google_project_iam_member.firestore_user["upload"]
  to   = google_project_iam_member.runtime["upload_firestore"]
}

moved {
  from = google_project_iam_member.firestore_user["ai_stream"]
  to   = google_project_iam_member.runtime["ai_stream_firestore"]
}

moved {
  from = google_project_iam_member.socket_instance_subscriptions
  to   = google_project_iam_member.runtime["socket_instance_subscriptions"]
}

moved {
  from = google_project_iam_member.ai_stream_vertex
  to   = google_project_iam_member.runtime["ai_stream_vertex"]
}

# -- iam.tf: allUsers on the two public endpoints (public_access = "allUsers"),
#    one for_each instead of two resources with count = 0 or 1.
moved {
  from = google_cloud_run_v2_service_iam_member.request_upload_public[0]
  to   = google_cloud_run_v2_service_iam_member.public["request_upload"]
}

moved {
  from = google_cloud_run_v2_service_iam_member.socket_public[0]
  to   = google_cloud_run_v2_service_iam_member.public["socket"]
}

# -- firestore.tf: the composite indexes, one for_each keyed by the query each serves.
moved {
  from = google_firestore_index.conversations_by_participant
  to   = google_firestore_index.indexes["conversations_by_participant"]
}

moved {
  from = google_firestore_index.messages_stale_replies
  to   = google_firestore_index.indexes["messages_stale_replies"]
}
