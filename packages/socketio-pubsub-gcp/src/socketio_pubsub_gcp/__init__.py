"""python-socketio client managers over Google Cloud Pub/Sub.

``AsyncGooglePubSubManager`` (asyncio servers) and ``GooglePubSubManager``
(threaded servers, and write-only emitters such as workers or Cloud
Functions) share one JSON wire format; each listening instance creates its
own subscriptions from a ``SubscriptionTemplate``. See README.md.
"""

from .async_publisher import AsyncPublisher
from .async_pubsub_manager import AsyncGooglePubSubManager
from .loop_runner import LoopRunner
from .publisher import Publisher
from .pubsub_manager import GooglePubSubManager
from .pubsub_rpc import backoff
from .subscriber import Subscriber
from .subscriptions import FilteredTopic, SubscriptionTemplate

__version__ = "0.1.0"

__all__ = ["AsyncGooglePubSubManager", "AsyncPublisher", "FilteredTopic", "GooglePubSubManager", "LoopRunner",
           "Publisher", "Subscriber", "SubscriptionTemplate", "__version__", "backoff"]
