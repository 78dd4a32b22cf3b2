"""The tracking store: whether it answers, and the default one following the repo when it moves.

`check_reachable` fails fast, before any work, on a store that cannot be reached;
`wait_writable` waits a bounded time (`mlflow.lock_wait_s`) for a sqlite store
another process holds locked; `lost_store` warns when the default store's
database is gone while stage manifests still record runs in it.

The default store is `mlflow/mlflow.db` + `mlflow/artifacts/`. MLflow records absolute `file://` artifact locations (per experiment, run,
logged model and model version). When the repo has been moved or copied, the
next stage (or `python -m pipeline.store`) rewrites the old
`file://<old repo>/mlflow/artifacts` prefix to the current one in the store's
own sqlite file, so every artifact link works again. Stores named by
`mlflow.tracking_uri` / `MLFLOW_TRACKING_URI` are left alone.

`ui_url` is the address on which `mlflow ui` over the default store opens an
experiment's runs table (model-training view) on its headline view (`view`), its
id read from the store.
"""
from __future__ import annotations

import json
import logging
import sqlite3
import time
import urllib.error
import urllib.request
from pathlib import Path

from ..core import layout
from ..errors import PipelineError

log = logging.getLogger(__name__)
SUFFIX = "/mlflow/artifacts"
#: (table, column) pairs that hold artifact locations in MLflow 3's schema.
COLUMNS = (("experiments", "artifact_location"), ("runs", "artifact_uri"), ("logged_models", "artifact_location"),
           ("model_versions", "storage_location"), ("model_versions", "source"))
#: What MLflow's tracking stores accept (a database URI may name a driver: mysql+pymysql://).
TRACKING_SCHEMES = ("sqlite", "file", "http", "https", "postgresql", "mysql", "mssql", "databricks")


def check_reachable(uri: str) -> None:
    """Fail fast, before any work, when the tracking store cannot be reached."""
    field = "mlflow.tracking_uri / MLFLOW_TRACKING_URI"
    if uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=5) as resp:
                resp.read()
        except (urllib.error.URLError, OSError, ValueError) as err:
            raise PipelineError(f"{field}: tracking server {uri} is unreachable ({err})") from None
    elif uri.startswith("sqlite:///"):
        db = Path(uri.removeprefix("sqlite:///"))
        try:
            db.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise PipelineError(f"{field}: cannot create {db.parent} ({err})") from None
    elif uri.startswith("sqlite:") or "://" not in uri and not uri.startswith("/"):
        raise PipelineError(f"{field}: {uri!r} is not a tracking URI (sqlite:////abs/path.db, http(s)://host, file:///dir)")
    elif "://" in uri and uri.split("://", 1)[0].split("+", 1)[0] not in TRACKING_SCHEMES:
        raise PipelineError(f"{field}: {uri!r} has an unknown scheme; use one of "
                            f"{', '.join(s + '://' for s in TRACKING_SCHEMES)}")


def wait_writable(uri: str, wait_s: float) -> None:
    """A sqlite store another process holds locked: wait up to `wait_s` seconds (one line saying so),
    then one error, before any run opens (so none is left RUNNING)."""
    if not uri.startswith("sqlite:///"):
        return
    db = Path(uri.removeprefix("sqlite:///"))
    if not db.is_file():
        return
    deadline, said = time.monotonic() + wait_s, False
    con = sqlite3.connect(db, timeout=0)
    try:
        while True:
            try:
                con.execute("BEGIN IMMEDIATE")  # the write lock every run needs; released at once
                con.rollback()
                return
            except sqlite3.OperationalError as err:
                if "locked" not in str(err) and "busy" not in str(err):
                    raise PipelineError(f"mlflow.tracking_uri: {db} is not usable ({err})") from None
            if time.monotonic() >= deadline:
                raise PipelineError(f"mlflow.lock_wait_s: {db} is still locked by another process after "
                                    f"{wait_s:g} s; nothing was started (raise mlflow.lock_wait_s to wait longer)")
            if not said:
                log.warning("%s is locked by another process; waiting up to %g s (mlflow.lock_wait_s)", db, wait_s)
                said = True
            time.sleep(min(0.25, max(deadline - time.monotonic(), 0)))
    finally:
        con.close()


def locked(err: BaseException) -> bool:
    """`err` (MLflow's, SQLAlchemy's or sqlite's) says a sqlite store was locked by another process."""
    return "database is locked" in str(err)


def when_unlocked(action, wait_s: float):
    """`action()`, retried for up to `wait_s` seconds while the sqlite store is locked (closing a run
    must not give up on the first lock, or the run stays RUNNING)."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return action()
        except Exception as err:  # MLflow wraps SQLAlchemy's OperationalError in its own exception
            if not locked(err) or time.monotonic() >= deadline:
                raise
            time.sleep(0.5)


def lost_store(root: Path, uri: str) -> str | None:
    """A warning when the default store's database is gone but stage manifests record runs in it."""
    db = default_db(root)
    if uri != f"sqlite:///{db}" or db.is_file():
        return None
    recorded = sorted(p.parent.name for p in (root / "artifacts").glob("*/manifest.json") if _in_default_store(p))
    if not recorded:
        return None
    return (f"WARNING: {db} is gone, but {len(recorded)} stage manifests ({', '.join(recorded)}) record runs in it: "
            "a new, empty store starts now, without their history and registered models; stop and restore it "
            "from a backup to keep them")


def _in_default_store(manifest: Path) -> bool:
    """The manifest records a run in a default store (this repo's, wherever the repo was then)."""
    try:
        uri = json.loads(manifest.read_text()).get("mlflow_tracking_uri") or ""
    except (OSError, ValueError, AttributeError):
        return False
    return uri.startswith("sqlite:///") and uri.endswith("/mlflow/mlflow.db")


def default_db(root: Path) -> Path:
    return layout.state_root(root) / "mlflow" / "mlflow.db"


def relocate(root: Path, db: Path | None = None) -> str | None:
    """Rewrite a moved repo's artifact prefix; returns the old prefix when it did."""
    db = db or default_db(root)
    if not db.is_file():
        return None
    new = (layout.state_root(root) / "mlflow" / "artifacts").as_uri()
    with sqlite3.connect(db) as con:
        have = {r[0] for r in con.execute("select name from sqlite_master where type='table'")}
        if "experiments" not in have:
            return None
        olds = {r[0][: r[0].index(SUFFIX) + len(SUFFIX)] for r in
                con.execute("select artifact_location from experiments where artifact_location like ?",
                            (f"file://%{SUFFIX}%",))}
        olds.discard(new)
        for old in olds:
            for table, col in COLUMNS:
                if table in have:
                    con.execute(f"update {table} set {col} = ? || substr({col}, ?) where {col} like ?",
                                (new, len(old) + 1, old + "%"))
    return ", ".join(sorted(olds)) or None


def experiment_id(db: Path, name: str) -> str | None:
    """The id of the active experiment `name` in the sqlite store `db` (read-only), None when it has none."""
    row = _query(db, "select experiment_id from experiments where name = ? and lifecycle_stage = 'active'", name)
    return None if row is None else str(row[0])


def has_view(db: Path, exp_id: str, tag: str) -> bool:
    """Whether experiment `exp_id` in `db` holds the experiment tag `tag` (read-only)."""
    return _query(db, "select 1 from experiment_tags where experiment_id = ? and key = ?", exp_id, tag) is not None


def _query(db: Path, sql: str, *args):
    if not db.is_file():
        return None
    con = sqlite3.connect(f"{db.as_uri()}?mode=ro", uri=True)
    try:
        return con.execute(sql, args).fetchone()
    except sqlite3.DatabaseError:  # not an MLflow store (yet)
        return None
    finally:
        con.close()


def ui_url(exp_id: str | None, port: int = 5000, view: str | None = None) -> str:
    """Where the MLflow UI shows experiment `exp_id`'s runs table in model-training mode, opened on the shared
    view `view` if given (the home page without an experiment)."""
    home = f"http://127.0.0.1:{port}/"
    if not exp_id:
        return home
    return f"{home}#/experiments/{exp_id}/runs?" + (f"viewStateShareKey={view}&" if view else "") + \
        "workflowType=machine_learning"
