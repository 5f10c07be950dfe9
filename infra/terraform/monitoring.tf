# Alerts: messages waiting in a dead-letter subscription (a function failed
# them max_delivery_attempts times), and replies stuck in streaming (the
# socket service's sweeper found no heartbeat: socket_service/app.py logs
# "reply <id> had no heartbeat for <n>s; marked failed" at WARNING; each such
# log entry matches the alert below).

resource "google_monitoring_notification_channel" "email" {
  for_each = toset(var.alert_emails)

  project      = var.project_id
  display_name = "Chat alerts: ${each.value}"
  type         = "email"
  labels = {
    email_address = each.value
  }

  depends_on = [google_project_service.apis]
}

resource "google_monitoring_alert_policy" "dead_letters" {
  for_each = local.pull_subscriptions

  project      = var.project_id
  display_name = "Chat: messages in dead-letter subscription ${each.value.name}"
  combiner     = "OR"

  conditions {
    display_name = "${each.value.name} has undelivered messages"
    condition_threshold {
      filter          = "resource.type = \"pubsub_subscription\" AND resource.labels.subscription_id = \"${google_pubsub_subscription.dead_letter[each.key].name}\" AND metric.type = \"pubsub.googleapis.com/subscription/num_undelivered_messages\""
      comparison      = "COMPARISON_GT"
      threshold_value = 0
      duration        = "60s"
      aggregations {
        alignment_period   = "60s"
        per_series_aligner = "ALIGN_MAX"
      }
    }
  }

  documentation {
    mime_type = "text/markdown"
    content   = "Messages on `${each.value.topic}` exhausted their delivery attempts. Inspect them with `gcloud pubsub subscriptions pull ${each.value.name} --limit 10` (add `--auto-ack` once handled) and read the function's logs; see docs/DEPLOY.md."
  }

  alert_strategy {
    auto_close = "86400s"
  }

  notification_channels = [for c in google_monitoring_notification_channel.email : c.id]
}

# A log-match alert on the sweeper's warning, not a log-based metric: an alert
# on a metric created in the same apply fails for minutes ("Error 404: Cannot
# find metric(s) that match type ... If a metric was created recently, it could
# take up to 10 minutes to become available").
locals {
  stale_replies_log_filter = "resource.type = \"cloud_run_revision\" AND resource.labels.service_name = \"${google_cloud_run_v2_service.socket.name}\" AND severity = \"WARNING\" AND jsonPayload.message =~ \"had no heartbeat\""
}

resource "google_monitoring_alert_policy" "stale_replies" {
  project      = var.project_id
  display_name = "Chat: AI replies stuck in streaming"
  combiner     = "OR"

  conditions {
    display_name = "replies failed by the stale-reply sweeper"
    condition_matched_log {
      filter = local.stale_replies_log_filter
    }
  }

  documentation {
    mime_type = "text/markdown"
    content   = "The socket service failed AI replies whose worker stopped sending heartbeats (ai_stream crashed, timed out or was scaled in mid-reply). Look at the ai-stream function's logs and the ai-requests dead-letter subscription."
  }

  # Required with a log-match condition: at most one notification per period.
  alert_strategy {
    notification_rate_limit {
      period = "300s"
    }
    auto_close = "1800s"
  }

  notification_channels = [for c in google_monitoring_notification_channel.email : c.id]

  depends_on = [google_project_service.apis]
}
