# Firestore in native mode, the composite indexes our queries need, the TTL
# field of pending uploads, and security rules that deny all direct client
# access (only the backend, through IAM, reads and writes).

locals {
  # On the region's continent (variables.tf validates a given one): the
  # multi-region nam5 for us-* regions, eur3 for europe-* regions, the region
  # itself elsewhere (https://cloud.google.com/firestore/docs/locations).
  firestore_location = coalesce(var.firestore_location, startswith(var.region, "us-") ? "nam5" : startswith(var.region, "europe-") ? "eur3" : var.region)
}

resource "google_firestore_database" "main" {
  project     = var.project_id
  name        = var.firestore_database
  location_id = local.firestore_location
  type        = "FIRESTORE_NATIVE"

  # Server client libraries' transactions (claiming replies, quotas, uploads).
  concurrency_mode                  = "PESSIMISTIC"
  app_engine_integration_mode       = "DISABLED"
  point_in_time_recovery_enablement = "POINT_IN_TIME_RECOVERY_ENABLED"
  delete_protection_state           = var.deletion_protection ? "DELETE_PROTECTION_ENABLED" : "DELETE_PROTECTION_DISABLED"
  deletion_policy                   = var.deletion_protection ? "ABANDON" : "DELETE"

  lifecycle {
    # A database's location cannot change; a new value (say a deployment made
    # when the default was nam5 whatever the region) must never plan its
    # replacement, which would lose every conversation.
    ignore_changes = [location_id]
  }

  depends_on = [google_project_service.apis]
}

# The composite indexes, by the query each serves; every field is ordered
# (ASCENDING or DESCENDING) or, for an array-contains filter, array_config = CONTAINS.
locals {
  firestore_indexes = {
    # GET /api/conversations (chatcore/store/conversations.py list_conversations):
    # participants array-contains <user> ORDER BY updated_key DESC (and
    # updated_key < cursor for the next page).
    conversations_by_participant = {
      collection  = "conversations"
      query_scope = null # the default, COLLECTION
      fields = [
        { field_path = "participants", order = null, array_config = "CONTAINS" },
        { field_path = "updated_key", order = "DESCENDING", array_config = null },
      ]
    }
    # The stale-reply sweeper (chatcore/store/replies.py fail_stale), across every
    # conversation: collection group `messages` WHERE status IN [pending,
    # streaming] AND heartbeat_at < cutoff.
    messages_stale_replies = {
      collection  = "messages"
      query_scope = "COLLECTION_GROUP"
      fields = [
        { field_path = "status", order = "ASCENDING", array_config = null },
        { field_path = "heartbeat_at", order = "ASCENDING", array_config = null },
      ]
    }
  }
}

resource "google_firestore_index" "indexes" {
  for_each = local.firestore_indexes

  project     = var.project_id
  database    = google_firestore_database.main.name
  collection  = each.value.collection
  query_scope = each.value.query_scope

  # In the order given: an index's field order is part of what it serves.
  dynamic "fields" {
    for_each = each.value.fields
    content {
      field_path   = fields.value.field_path
      order        = fields.value.order
      array_config = fields.value.array_config
    }
  }
}

# Every other query uses one field (messages by sort_key, replies in progress
# by status within a conversation, chunks by seq) and is served by Firestore's
# automatic single-field indexes.

# Pending uploads expire through a TTL field (topology.json -> uploads);
# accepting an upload removes the field. Not indexed: nothing queries it, and
# an indexed timestamp that only grows would be a write hotspot.
resource "google_firestore_field" "pending_upload_ttl" {
  project    = var.project_id
  database   = google_firestore_database.main.name
  collection = local.uploads_layout.pending_collection
  field      = local.uploads_layout.pending_expiry_field

  ttl_config {}
  index_config {}
}

# Security rules: deny every direct client read and write.
resource "google_firebaserules_ruleset" "firestore" {
  project = var.project_id

  source {
    files {
      name    = "firestore.rules"
      content = file("${path.module}/firestore.rules")
    }
  }

  depends_on = [google_firestore_database.main]
}

resource "google_firebaserules_release" "firestore" {
  project      = var.project_id
  name         = var.firestore_database == "(default)" ? "cloud.firestore" : "cloud.firestore/${var.firestore_database}"
  ruleset_name = "projects/${var.project_id}/rulesets/${google_firebaserules_ruleset.firestore.name}"

  lifecycle {
    replace_triggered_by = [google_firebaserules_ruleset.firestore]
  }
}
