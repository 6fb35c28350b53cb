"""The release, fleet and control messages (hub, relays, nodes, the CLI): typed, validated
structs; headers are msgpack maps (unknown keys are ignored, so fields may be appended)."""

from __future__ import annotations

import enum
from typing import Annotated

import msgspec

from .. import defaults

__all__ = [
    "Word",
    "WaveState",
    "WavePlan",
    "NonNeg",
    "V",
    "HUB_TOPIC",
    "ModelState",
    "ChunkHeader", "PatchHeader",
    "Heartbeat",
    "Activate",
    "Activated",
    "FetchManifest",
    "FetchChunks",
    "Report",
    "Publish",
    "Reserve",
    "Reserved",
    "Published",
    "Rollback",
    "StatusRequest",
    "ReleasesRequest",
    "Pin",
    "Pinned",
    "ReleaseInfo",
    "ReleasesReply",
    "NodeStatus",
    "WaveStatus",
    "ModelStatus",
    "StatusReply",
    "ErrorReply",
    "V",
    "HUB_TOPIC",
    "STATES",
]

NonNeg = Annotated[int, msgspec.Meta(ge=0)]
V = defaults.PROTOCOL_VERSION
HUB_TOPIC = b"\0"


class Word(str, enum.Enum):
    """A string enum that prints as its value (``enum.StrEnum`` is Python 3.11+)."""

    def __str__(self) -> str:
        return str(self.value)

    def __format__(self, spec: str) -> str:
        return format(str(self.value), spec)


class ModelState(Word):
    """What a node reports for one model (``Report.state``)."""

    RECEIVING = "receiving"  # a release is arriving (``seq``: the one arriving)
    VERIFIED = "verified"  # it passed its digests and signature (``seq``: that release)
    LOADING = "loading"  # rolling it through the workers (``seq``: the one being rolled)
    LOADED = "loaded"  # loaded and checked, not yet serving (embedded ``swap_when``)
    SERVING = "serving"  # every ready worker serves ``seq``
    REJECTED = "rejected"  # ``seq`` was refused; ``reason`` says why (sent once, then the held state)
    IDLE = "idle"  # nothing loaded yet
    ERROR = "error"  # the node cannot serve or store this model; ``reason`` says why
    LOST = "lost"  # (the hub's table only) the node has not reported for a while
    STOPPED = "stopped"  # the node stopped cleanly (its last report; ``seq``: what it served)


STATES = tuple(s.value for s in ModelState)


class WaveState(Word):
    """Where a staged rollout in waves stands (``WaveStatus.state``)."""

    RUNNING = "running"  # a wave is being activated or watched
    DONE = "done"  # every wave serves the release
    HALTED = "halted"  # stopped; ``WaveStatus.reason`` says why


class WavePlan(msgspec.Struct, frozen=True):
    """A staged rollout in waves, one record from the CLI to the wire (``Publish.plan``) and
    into the hub: activate the release in these cumulative ``waves`` (``"1"``, ``"10%"``, ...),
    watching each for ``wave_wait_s`` once it serves, halting on ``halt_on`` conditions
    (``"rejected"``, always on; ``"error-rate>1%"``); a wave node must serve within ``confirm_s``."""

    waves: list[str]
    wave_wait_s: Annotated[float, msgspec.Meta(ge=0)] = 0.0
    halt_on: list[str] = []
    confirm_s: Annotated[float, msgspec.Meta(gt=0)] = 120.0


class ChunkHeader(msgspec.Struct, frozen=True):
    name: str
    seq: NonNeg
    index: NonNeg
    v: int = V


class PatchHeader(msgspec.Struct, frozen=True):
    """Chunk ``index`` as a difference: its span XOR the span of the sender's previous release
    whose raw digest is ``base_xxh3`` (docs/protocol.md §Deltas)."""

    name: str
    seq: NonNeg
    index: NonNeg
    base_xxh3: int
    v: int = V


class Heartbeat(msgspec.Struct, frozen=True):
    """Per model: its newest seq and sha256. ``name == ""``: the hub's own beat."""

    hub: str
    name: str = ""
    seq: NonNeg = 0
    sha256: str = ""
    label: str = ""
    v: int = V
    path: list[str] = []  # the hub's own beat: the relays it passed, root first (loop check)
    # staged releases up to this seq are active on every node (0: nothing staged is active
    # fleet-wide; a release published without ``staged`` is active on arrival regardless)
    active: NonNeg = 0


class Activate(msgspec.Struct, frozen=True):
    """Serve staged release ``seq`` of ``name``. On the PUB (hub -> nodes, the model's topic):
    ``nodes`` are the node ids it applies to (empty: every node). On the ROUTER (CLI -> hub):
    ``nodes`` and ``labels`` select (none: every node, fleet-wide); the hub answers ACTIVATED."""

    name: str
    seq: NonNeg
    nodes: list[str] = []
    labels: list[str] = []
    v: int = V


class Activated(msgspec.Struct, frozen=True):
    """The hub's answer to ACTIVATE: the nodes it now activates (``fleet``: all, for good)."""

    name: str
    seq: NonNeg
    nodes: list[str]
    fleet: bool = False
    v: int = V


class FetchManifest(msgspec.Struct, frozen=True):
    name: str
    seq: NonNeg = 0  # 0 = the newest
    v: int = V


class FetchChunks(msgspec.Struct, frozen=True):
    name: str
    seq: NonNeg
    indices: list[NonNeg]
    v: int = V


class Report(msgspec.Struct, frozen=True):
    """A node's state for one model, sent on every change and every heartbeat interval."""

    node: str
    model: str
    state: ModelState
    seq: NonNeg = 0
    label: str = ""
    reason: str = ""
    host: str = ""
    pid: NonNeg = 0
    device: str = ""
    v: int = V
    # seconds per stage of the newest release this node took in (``stages_seq``): receive,
    # cache_write, load, check (example check and warm-up), roll (verified -> all serving)
    stages: dict[str, float] = {}
    stages_seq: NonNeg = 0
    via: list[str] = []  # the relays the report came through, the node's own first
    staged: NonNeg = 0  # a verified, cached release this node holds but does not serve yet
    labels: list[str] = []  # the node's labels (``serve --label``), for waves and ACTIVATE
    requests: NonNeg = 0  # requests answered by ``seq`` since the node started
    errors: NonNeg = 0  # of those, with a server-side error (model_error, internal, worker_lost)
    # what release ``stages_seq`` cost the link (bytes_received, chunks_received, chunks_fetched,
    # chunks_patched, bytes_reused, chunks_reused, bytes_duplicate) and how it was taken in
    moved: dict[str, NonNeg] = {}
    how: str = ""  # "apply" (new tensors into the code served) or "load"
    how_reason: str = ""  # why "load"
    format: str = ""  # the release format it serves ("torchscript" or "pt2"; "": not said)


class Publish(msgspec.Struct, frozen=True):
    signature: bytes = b""  # of the manifest frame that follows; empty = unsigned
    v: int = V
    plan: WavePlan | None = None  # a staged rollout in waves (the manifest must be staged)
    reuse_label: bool = False  # store it even if a stored release of the model has its label


class Reserve(msgspec.Struct, frozen=True):
    """Ask the hub for the next seq of ``name``, to sign a release as that seq before
    publishing it. ``base`` (a label or seq) also returns that stored release's manifest, for
    a signed rollback."""

    name: str
    base: str = ""
    v: int = V


class Reserved(msgspec.Struct, frozen=True):
    name: str
    seq: NonNeg
    v: int = V


class Published(msgspec.Struct, frozen=True):
    name: str
    seq: NonNeg
    label: str
    sha256: str
    v: int = V
    note: str = ""  # something the publisher should know (e.g. the store's seq floor was raised)
    store_s: float = 0.0  # the hub verifying and storing it
    broadcast_s: float = 0.0  # the hub queueing it on its PUB socket


class Rollback(msgspec.Struct, frozen=True):
    name: str
    to: str  # a label or a seq
    v: int = V


class StatusRequest(msgspec.Struct, frozen=True):
    v: int = V


class ReleasesRequest(msgspec.Struct, frozen=True):
    """``[b"RELEASES", ReleasesRequest]``: the stored releases of ``name`` ("" = every model)."""

    name: str = ""
    v: int = V


class Pin(msgspec.Struct, frozen=True):
    """``[b"PIN", Pin]``: keep release ``to`` (a label or seq) of ``name`` through retention
    (``on``), or let retention have it again (not ``on``)."""

    name: str
    to: str
    on: bool = True
    v: int = V


class Pinned(msgspec.Struct, frozen=True):
    name: str
    seq: NonNeg  # the release ``to`` named
    pins: list[int]  # every pinned seq of ``name`` now
    v: int = V


class ReleaseInfo(msgspec.Struct, frozen=True):
    name: str
    seq: NonNeg
    label: str
    created_at: float
    archive_bytes: NonNeg
    compressed_bytes: NonNeg
    codec: str  # "zstd/shuffle", "none/none"
    signer: str  # hex public key, "" = unsigned
    rollback_of: NonNeg  # the seq whose content this restores, 0 = none
    serving: NonNeg  # nodes reporting it serving (lost nodes not counted)
    sha256: str = ""  # the archive's sha256
    pinned: bool = False  # retention never prunes it (PIN)


class ReleasesReply(msgspec.Struct, frozen=True):
    releases: list[ReleaseInfo]
    v: int = V


class NodeStatus(msgspec.Struct, frozen=True):
    node: str
    model: str
    state: ModelState
    seq: int
    label: str
    reason: str
    host: str
    pid: int
    device: str
    age_s: float
    rejected_seq: int = 0  # the last seq this node rejected for this model, 0 = none
    last_error: str = ""
    stages: dict[str, float] = {}  # Report.stages of the release ``stages_seq``
    stages_seq: int = 0
    via: list[str] = []  # the relays between this node and the hub
    staged: int = 0  # a release it holds but does not serve yet
    labels: list[str] = []
    requests: int = 0  # Report.requests / errors, as last reported
    errors: int = 0
    moved: dict[str, int] = {}  # Report.moved / how / how_reason of release ``stages_seq``
    how: str = ""
    how_reason: str = ""
    format: str = ""  # Report.format


class WaveStatus(msgspec.Struct, frozen=True):
    """A staged rollout in waves, as the hub runs it (``StatusReply.rollouts``)."""

    name: str
    seq: int
    state: WaveState
    wave: int  # the wave being activated or watched, 1-based (== waves when done)
    waves: list[int]  # cumulative node counts of each wave
    activated: list[str]  # nodes told to serve seq
    serving: list[str]  # of those, nodes reporting seq serving
    failed: dict[str, str] = {}  # node -> why it failed the wave
    reason: str = ""  # why it halted
    rollback_seq: int = 0  # the release published to undo it (0: none was needed)
    started_at: float = 0.0  # wall-clock
    v: int = V


class ModelStatus(msgspec.Struct, frozen=True):
    name: str
    seq: int  # the newest stored release
    label: str
    sha256: str
    archive_bytes: int
    active: int = 0  # the seq active fleet-wide (0: none; staged releases wait for activation)


class StatusReply(msgspec.Struct, frozen=True):
    hub: str
    models: list[ModelStatus]
    nodes: list[NodeStatus]
    stats: dict[str, int] = {}
    v: int = V
    rollouts: list[WaveStatus] = []


class ErrorReply(msgspec.Struct, frozen=True):
    code: str
    message: str
    name: str = ""  # the model a FETCH_* (or inference) request named
    seq: NonNeg = 0  # the seq it named
    retryable: bool = False
    v: int = V
    id: str = ""  # the inference request it answers
    indices: list[NonNeg] = []  # FETCH_CHUNKS: the indexes it asked for

