"""Cloud Function entry point (functions-framework, CloudEvent signature).

Fed by the push subscription on ``ai-requests`` (see chatcore/topology.json):
functions-framework turns the raw Pub/Sub push into a
``google.cloud.pubsub.topic.v1.messagePublished`` CloudEvent.
"""

import functions_framework

from aistream.handler import handle_event


@functions_framework.cloud_event
def ai_stream(cloud_event) -> None:
    handle_event(cloud_event)
