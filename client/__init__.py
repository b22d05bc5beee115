"""loomnet.client — network layer, offer table, routing and the client library.

``client/`` is how any peer joins the network (``Member``: the libp2p node, gossip,
the offer table) and how it asks for work (``LoomClient``). The executor in
``loomnet.node`` joins through the same ``Member``. Only ``_p2p`` imports libp2p.
"""

from ._attempt import fails_over as fails_over
from ._batch import BatchProgress as BatchProgress, ChatRequest as ChatRequest, Outcome as Outcome
from ._budget import (
    Budget as Budget,
    BudgetConfig as BudgetConfig,
    BudgetExceeded as BudgetExceeded,
    BudgetStatistics as BudgetStatistics,
    BudgetWarning as BudgetWarning,
    JointBudget as JointBudget,
)
from ._chat_stream import (
    ChatResult as ChatResult,
    ChatStream as ChatStream,
    RequestOptions as RequestOptions,
    StreamKit as StreamKit,
)
from ._client import ClientConfig as ClientConfig, LoomClient as LoomClient, default_data_dir as default_data_dir
from ._events import (
    Attempt as Attempt,
    ChatEvent as ChatEvent,
    Done as Done,
    ReasoningDelta as ReasoningDelta,
    TextDelta as TextDelta,
    ToolCallsDelta as ToolCallsDelta,
    Usage as Usage,
)
from ._frame_io import FrameIO as FrameIO
from ._identity_file import load_or_create_identity as load_or_create_identity
from ._ledger import (
    Ledger as Ledger,
    LedgerEntry as LedgerEntry,
    LedgerTotals as LedgerTotals,
    check_account as check_account,
)
from ._ledger_writes import LedgerStatistics as LedgerStatistics
from ._local import (
    local_executors as local_executors,
    remove_local_executor as remove_local_executor,
    state_dir as state_dir,
    write_local_executor as write_local_executor,
)
from ._member import Member as Member
from ._memory_stream import (
    MemoryP2PStream as MemoryP2PStream,
    MemoryStreamOpener as MemoryStreamOpener,
    stream_pair as stream_pair,
)
from ._offers import Offer as Offer, OfferTable as OfferTable
from ._open_client import open_client as open_client
from ._p2p import NodeInfo as NodeInfo, P2PConfig as P2PConfig, P2PNode as P2PNode, P2PStream as P2PStream
from ._receipts import check_receipt as check_receipt
from ._route import Candidate as Candidate, RequestShape as RequestShape, Route as Route
from ._health import ExecutorHealth as ExecutorHealth
from ._router import OfferRouter as OfferRouter, rank_offers as rank_offers
from ._session_pool import SessionPool as SessionPool, SessionPoolStatistics as SessionPoolStatistics
from ._tokens import TokenCounter as TokenCounter

__all__ = [
    "Attempt",
    "BatchProgress",
    "Budget",
    "BudgetConfig",
    "BudgetExceeded",
    "BudgetStatistics",
    "BudgetWarning",
    "Candidate",
    "ChatEvent",
    "ChatRequest",
    "ChatResult",
    "ChatStream",
    "ClientConfig",
    "Done",
    "FrameIO",
    "JointBudget",
    "Ledger",
    "LedgerEntry",
    "LedgerStatistics",
    "LedgerTotals",
    "LoomClient",
    "Member",
    "MemoryP2PStream",
    "MemoryStreamOpener",
    "NodeInfo",
    "Offer",
    "OfferTable",
    "Outcome",
    "P2PConfig",
    "P2PNode",
    "P2PStream",
    "ReasoningDelta",
    "RequestOptions",
    "RequestShape",
    "ExecutorHealth",
    "OfferRouter",
    "Route",
    "SessionPool",
    "SessionPoolStatistics",
    "StreamKit",
    "TextDelta",
    "TokenCounter",
    "ToolCallsDelta",
    "Usage",
    "check_account",
    "check_receipt",
    "default_data_dir",
    "fails_over",
    "load_or_create_identity",
    "local_executors",
    "open_client",
    "rank_offers",
    "remove_local_executor",
    "state_dir",
    "stream_pair",
    "write_local_executor",
]
