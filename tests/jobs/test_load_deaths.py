"""The load-death rule's bookkeeping (jobs/runner.py RowTracker.begin_load) and what a Ray worker preloads, without
Ray: a node lost while its actors load must not end the job, and a worker loads only the models its rows need."""

from __future__ import annotations

from jobs.inputs import Utterance
from jobs.render import RenderConfig
from jobs.runner import MAX_WORKER_LOSSES, RowTracker, _models_of


def test_load_deaths_are_counted_per_actor():
    """Review: one job-wide count ended the job when a node with 3 loading actors was lost (each restarted once),
    and every later actor start failed too. Per actor, only one that dies on every load gives up."""
    t = RowTracker()
    for a in ("a1", "a2", "a3", "a4"):
        assert t.begin_load(a) == 0
    for a in ("a1", "a2", "a3"):            # their node was lost while they loaded: Ray restarts each once
        assert t.begin_load(a) == 1
        t.end_load(a)
    t.end_load("a4")
    assert t.begin_load("a5") == 0 and max(t.load_deaths.values()) < MAX_WORKER_LOSSES
    deaths = [t.begin_load("oom") for _ in range(MAX_WORKER_LOSSES + 1)]   # dies loading, every time
    assert deaths == list(range(MAX_WORKER_LOSSES + 1))


def test_a_worker_preloads_only_the_models_its_rows_use():
    """Review: workers preloaded every model of the input, also those whose rows were all committed already (a
    resumed job), which could run a worker sized for one model out of memory."""
    cfg = RenderConfig(model="A", models={"A": {"path": "/models/A"}, "B": {"path": "/models/B"}, "hub/C": {}})
    rows = [Utterance(id="1", text="x", model="A"), Utterance(id="2", text="y"),
            Utterance(id="3", text="z", model="hub/C"), Utterance(id="4", text="w", model="B", error="bad row")]
    assert _models_of(rows, cfg) == ("/models/A", "hub/C")
    assert _models_of([], cfg) == ()


def test_a_start_lost_with_its_node_is_not_charged_to_the_row(monkeypatch):
    """A worker node removed (pre-empted, scaled down) loses the batch it ran: its rows start again elsewhere. That
    is the node's doing, not the rows': three such losses failed innocent rows as "worker lost 3 times"."""
    t = RowTracker()
    gone: set[str] = set()
    monkeypatch.setattr(RowTracker, "nodes_gone", staticmethod(lambda nodes: nodes & gone))
    assert t.begin(["r1", "r2"], "n1") == {"r1": 0, "r2": 0}
    gone.add("n1")                                   # n1 removed while r1, r2 ran there
    assert t.begin(["r1", "r2"], "n2") == {"r1": 0, "r2": 0}
    assert t.begin(["r1"], "n2") == {"r1": 1}        # n2 alive: r1's process died there, charged
    t.finished([("r2", "ok", 1.0)])
    assert t.lost_starts(["r1", "r2"]) == {"r1": 2, "r2": 0}
