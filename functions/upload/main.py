"""Cloud Function entry points of the upload path (functions-framework); one source, two targets.

- ``request_upload`` (HTTP): answers a V4 signed PUT URL for one file.
- ``on_upload_finalized`` (CloudEvent): fed by the push subscription on
  ``gcs-uploads`` (the bucket's OBJECT_FINALIZE notifications, see
  chatcore/topology.json), or directly by an Eventarc
  ``google.cloud.storage.object.v1.finalized`` trigger.
"""

import functions_framework
from uploads.handler import handle_finalize_event, handle_request_upload


@functions_framework.http
def request_upload(request):
    return handle_request_upload(request)


@functions_framework.cloud_event
def on_upload_finalized(cloud_event) -> None:
    handle_finalize_event(cloud_event)
