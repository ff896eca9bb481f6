"""Run the benchmarks: ``python -m benchmarks [--db sqlite|postgresql] [--subscribers N] [--quick]``.

Each figure is the median of several runs after a warm-up, beside a floor measured in the
same run on the same machine, and their ratio: the machines are shared and noisy, so a
ratio holds where an absolute time does not.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import functools
import http.client
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from . import dataset, floors, service
from .dataset import Database

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results.json"
PG_SERVER = os.environ.get("PREFS_BENCH_POSTGRESQL", "postgresql://postgres@127.0.0.1:5432/postgres")


def stats(values: list[float]) -> dict[str, float]:
    """Return the median, min and max of the runs."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": len(values)}


@contextmanager
def database(kind: str, workdir: Path, name: str = "bench") -> Iterator[Database]:
    """Make an empty database of ``kind`` for the run, and remove it afterwards."""
    if kind == "sqlite":
        path = workdir / f"{name}.sqlite3"
        try:
            yield Database("sqlite", f"sqlite:///{path}", path=str(path))
        finally:
            for leftover in workdir.glob(f"{name}.sqlite3*"):
                leftover.unlink()
        return
    import psycopg

    name = f"prefs_{name}_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(PG_SERVER, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    dsn = PG_SERVER.rsplit("/", 1)[0] + "/" + name
    try:
        yield Database("postgresql", dsn.replace("postgresql://", "postgresql+psycopg://"), dsn=dsn)
    finally:
        with psycopg.connect(PG_SERVER, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def make_key(db: Database) -> str:
    """Create an API key with every scope straight in the database; return its secret."""
    import hashlib
    import secrets

    secret = "prefs_" + secrets.token_urlsafe(32)
    digest = hashlib.sha256(secret.encode()).hexdigest()
    m = db.mark
    with db.connect() as conn:
        conn.execute(
            f"INSERT INTO api_keys (name, secret_hash, scopes, created_at) VALUES ({m}, {m}, {m}, CURRENT_TIMESTAMP)",
            (f"bench-{secret[-6:]}", digest, "admin read send write"),
        )
    return secret


def request(
    origin: str, method: str, path: str, key: str, body: bytes | None = None, accept: str = "application/json"
) -> tuple[int, bytes]:
    """Send one request and read the whole answer."""
    host, port = origin.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=600)
    headers = {"Authorization": f"Bearer {key}", "Accept": accept}
    if body is not None:
        headers["Content-Type"] = "application/json"
    conn.request(method, path, body=body, headers=headers)
    response = conn.getresponse()
    data = response.read()
    conn.close()
    return response.status, data


def timed(call: Callable[[], Any]) -> tuple[float, Any]:
    """Return the seconds a call took, and what it returned."""
    started = time.perf_counter()
    value = call()
    return time.perf_counter() - started, value


def cpu_seconds(pid: int) -> float:
    """Return the CPU time a process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure_check(
    db: Database, svc: service.Service, key: str, size: int, runs: int, rng: random.Random
) -> dict[str, Any]:
    """Time the check of ``size`` recipients over HTTP, and the driver's lookup of the same addresses."""
    seed = int(time.time())

    def check(run: int) -> tuple[float, list[str]]:
        batch = dataset.check_batch(db, size, seed + run, rng)
        body = json.dumps({"topic": "news", "campaign": "bench", "recipients": batch}).encode()
        seconds, (status, data) = timed(
            functools.partial(request, svc.origin, "POST", "/api/v1/check", key, body)
        )
        results = json.loads(data)["results"] if status == 200 else []
        if status != 200 or len(results) != size:
            raise RuntimeError(f"check answered {status} with {len(results)} results: {data[:300]!r}")
        return seconds, batch

    # the warm-up: every worker serves a check first (a long-lived worker has compiled its
    # statements and read its caches; a fresh one has not). The kernel picks the worker,
    # so send checks until each worker's CPU time shows it served one, a bounded number.
    workers = svc.workers()
    cold = set(workers)
    for run in range(4 * len(workers)):
        if not cold:
            break
        before = {pid: cpu_seconds(pid) for pid in cold}
        check(-1 - run)
        cold = {pid for pid in cold if cpu_seconds(pid) - before[pid] < 0.02}
    ours, floor = [], []
    for run in range(runs):
        seconds, batch = check(run)
        valid = [a for a in batch if "@@" not in a]
        ours.append(seconds)
        floor.append(floors.lookup(db, valid))
    return {"ours": stats(ours), "floor": stats(floor), "cold_workers_left": len(cold)}


def mint_tokens(db: Database, count: int, rng: random.Random) -> list[str]:
    """Return distinct one-click tokens, each a real opt-out."""
    sys.path.insert(0, str(service.ROOT))
    from prefs.domain.tokens import Tokens

    tokens = Tokens([service.SECRET])
    return [
        tokens.unsubscribe(pid, topic, "bench") for pid, topic in dataset.one_click_targets(db, count, rng)
    ]


def wrk(origin: str, tokens: list[str], seconds: int, connections: int, workdir: Path) -> dict[str, Any]:
    """Drive one-click POSTs with wrk and return its figures."""
    path = workdir / "tokens.txt"
    path.write_text("\n".join(tokens) + "\n")
    threads = 2
    out = subprocess.run(
        ["wrk", f"-t{threads}", f"-c{connections}", f"-d{seconds}s", "--latency", "--timeout", "10s",
         "-s", str(HERE / "oneclick.lua"), origin, "--", str(path), str(threads)],
        capture_output=True, text=True, check=True, timeout=seconds + 60,
    )  # fmt: skip
    line = next(line for line in out.stdout.splitlines() if line.startswith("RESULT "))
    figures: dict[str, Any] = json.loads(line.removeprefix("RESULT "))
    figures["rps"] = figures["requests"] / (figures["duration_us"] / 1e6)
    figures["errors"] = sum(figures[k] for k in ("connect", "read", "write", "status", "timeout"))
    return figures


def measure_one_click(
    db: Database, runs: int, seconds: int, connections: int, workdir: Path, rng: random.Random
) -> dict[str, Any]:
    """Sustained one-click POSTs against the service and against the bare floor app, alternately."""
    per_run = min(max(2000, seconds * 4000), db.size * 4 // (runs + 1))
    tokens = mint_tokens(db, per_run * (runs + 1), rng)
    ours, floor = [], []
    for run in range(runs + 1):
        chunk = tokens[run * per_run : (run + 1) * per_run]
        svc = service.start("wsgi:app", db.url, workdir / f"oneclick-{run}.log")
        try:
            result = wrk(svc.origin, chunk, seconds if run else 1, connections, workdir)
        finally:
            svc.stop()
        bare = service.start("benchmarks.floor_app:app", db.url, workdir / f"floor-{run}.log")
        try:
            bare_result = wrk(bare.origin, chunk, seconds if run else 1, connections, workdir)
        finally:
            bare.stop()
        if run:
            ours.append(result)
            floor.append(bare_result)
    return {
        "ours_rps": stats([r["rps"] for r in ours]),
        "floor_rps": stats([r["rps"] for r in floor]),
        "p99_ms": stats([r["p99_us"] / 1000 for r in ours]),
        # not a target: how this machine's tail looks for the floor in the same run
        "floor_p99_ms": stats([r["p99_us"] / 1000 for r in floor]),
        "errors": sum(r["errors"] for r in ours),
        "floor_errors": sum(r["errors"] for r in floor),
        "requests": sum(r["requests"] for r in ours),
    }


class RssWatch:
    """Sample the workers' resident memory while something runs."""

    def __init__(self, svc: service.Service) -> None:
        self.svc = svc
        self.before = {pid: service.rss_mb(pid) for pid in svc.workers()}
        self.peak = dict(self.before)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            for pid in list(self.peak):
                with contextlib.suppress(FileNotFoundError):
                    self.peak[pid] = max(self.peak[pid], service.rss_mb(pid))

    def __enter__(self) -> RssWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def growth(self) -> float:
        return max(self.peak[pid] - self.before[pid] for pid in self.before)


def measure_export(db: Database, svc: service.Service, key: str, runs: int) -> dict[str, Any]:
    """Stream the whole suppression list as CSV; the floor writes the same rows with the driver."""
    ours, floor, growth, rows = [], [], [], 0
    for run in range(runs + 1):
        with RssWatch(svc) as watch:
            seconds, (status, data) = timed(
                lambda: request(svc.origin, "GET", "/api/v1/suppressions", key, accept="text/csv")
            )
        if status != 200:
            raise RuntimeError(f"export answered {status}: {data[:200]!r}")
        rows = data.count(b"\n") - 1
        floor_rows, floor_seconds = floors.export(db)
        if run:
            ours.append(rows / seconds)
            floor.append(floor_rows / floor_seconds)
            growth.append(watch.growth)
    return {"ours": stats(ours), "floor": stats(floor), "rss_growth_mb": stats(growth), "rows": rows}


def measure_sync(db: Database, svc: service.Service, key: str, runs: int, page: int) -> dict[str, Any]:
    """Page through the whole change feed; the floor reads the same rows by keyset."""
    ours, floor, rows = [], [], 0

    def read_all() -> int:
        count, cursor = 0, ""
        while True:
            path = f"/api/v1/changes?limit={page}" + (f"&after={cursor}" if cursor else "")
            status, data = request(svc.origin, "GET", path, key)
            body = json.loads(data)
            if status != 200:
                raise RuntimeError(f"changes answered {status}: {data[:200]!r}")
            if not body["items"]:
                return count
            count += len(body["items"])
            cursor = body["next_cursor"]

    for run in range(runs + 1):
        seconds, rows = timed(read_all)
        floor_rows, floor_seconds = floors.keyset(db, page)
        if run:
            ours.append(rows / seconds)
            floor.append(floor_rows / floor_seconds)
    return {"ours": stats(ours), "floor": stats(floor), "rows": rows}


def measure_import(kind: str, rows: int, runs: int, workdir: Path) -> dict[str, Any]:
    """Import a SendGrid-style suppression CSV of ``rows`` new addresses with ``flask --app prefs
    import`` into a fresh database; the floor inserts the same rows with the driver."""

    def write(name: str, count: int) -> tuple[Path, int]:
        path = workdir / name
        with path.open("w") as f:
            f.write("email,created\n")
            for i in range(count):
                f.write(f"Imported{i}@Example{i % 1000}.com,{1_600_000_000 + i}\n")
        return path, count

    warm_up, timed_file = write("warm-up.csv", min(rows, 10_000)), write("suppressions.csv", rows)
    ours, floor, cpu = [], [], []
    for run in range(runs + 1):
        path, expected = timed_file if run else warm_up
        with database(kind, workdir, f"import-{run}") as db:
            dataset.create_schema(db)
            started = time.perf_counter()
            before = os.times()
            out = subprocess.run(
                [sys.executable, "-m", "flask", "--app", "prefs", "import", str(path), "--format", "sendgrid"],
                env=dataset.command_env(db), cwd=service.ROOT, check=True, capture_output=True, text=True,
            )  # fmt: skip
            seconds = time.perf_counter() - started
            after = os.times()
        if f"read {expected}, added {expected}," not in out.stdout:
            summary = out.stdout.strip().splitlines()[0] if out.stdout.strip() else out.stderr[-300:]
            raise RuntimeError(f"import of {expected} rows said: {summary}")
        with database(kind, workdir, f"import-floor-{run}") as db:
            dataset.create_schema(db)
            floor_rows, floor_seconds = floors.suppress_file(db, str(path))
        if run:
            ours.append(rows / seconds)
            used = after.children_user + after.children_system - before.children_user - before.children_system
            cpu.append(rows / used)
            floor.append(floor_rows / floor_seconds)
    return {"ours": stats(ours), "floor": stats(floor), "ours_per_cpu_second": stats(cpu), "rows": rows}


OVERVIEW_PATHS = ("/admin", "/admin/charts/opt-outs.svg", "/admin/charts/sources.svg", "/admin/requests")


def page(origin: str, path: str, key: str) -> tuple[int, bytes]:
    """Get one overview page with the admin key as the Basic password."""
    host, port = origin.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=600)
    credentials = base64.b64encode(f"ops:{key}".encode()).decode()
    conn.request("GET", path, headers={"Authorization": f"Basic {credentials}"})
    response = conn.getresponse()
    data = response.read()
    conn.close()
    return response.status, data


def measure_overview(kind: str, subscribers: int, runs: int, workdir: Path) -> dict[str, Any]:
    """Open the overview over 2x the subscribers, 10x as many events and a tenth as many open requests.

    On PostgreSQL the service's role has a statement_timeout of 300 ms in that database,
    as an operator guarding the database would set: every page must still answer 200.
    """
    events, open_requests = 10 * subscribers, max(subscribers // 10, 100)
    size = 2 * subscribers
    with database(kind, workdir, "overview") as db:
        dataset.create_schema(db)
        key = make_key(db)
        started = time.perf_counter()
        timings = dataset.overview_data(db, size, events, open_requests)
        built = time.perf_counter() - started
        if kind == "postgresql":
            with db.connect() as conn:
                name = db.dsn.rsplit("/", 1)[1]
                conn.execute(
                    f"ALTER ROLE CURRENT_USER IN DATABASE \"{name}\" SET statement_timeout = '300ms'"
                )
        svc = service.start("wsgi:app", db.url, workdir / "overview.log")
        try:
            for path in OVERVIEW_PATHS:  # every worker's first page, and the caches warm
                for _ in range(len(svc.workers())):
                    page(svc.origin, path, key)
            times: dict[str, list[float]] = {path: [] for path in OVERVIEW_PATHS}
            sizes: dict[str, int] = {}
            for _ in range(runs * 3):
                for path in OVERVIEW_PATHS:
                    seconds, (status, data) = timed(functools.partial(page, svc.origin, path, key))
                    if status != 200:
                        raise RuntimeError(f"{path} answered {status}: {data[:300]!r}")
                    times[path].append(seconds)
                    sizes[path] = len(data)
        finally:
            svc.stop()
    return {
        "page": stats(times["/admin"]),
        "others": {path: stats(times[path]) for path in OVERVIEW_PATHS[1:]},
        "bytes": sizes["/admin"],
        "subscribers": size,
        "events": events,
        "open_requests": open_requests,
        "build_seconds": built,
        "build": timings,
    }


def run(kind: str, subscribers: int, quick: bool, workdir: Path) -> dict[str, Any]:
    """Build the data set and measure every figure on one database."""
    rng = random.Random(2026)
    runs = 2 if quick else 5
    check_size = 500 if quick else 10_000
    # the check samples 90% known recipients from the data set: it must hold that many
    sizes = sorted({max(subscribers // 100, check_size), max(subscribers // 10, check_size), subscribers})
    figures: dict[str, Any] = {"db": kind, "subscribers": subscribers, "quick": quick}
    with database(kind, workdir) as db:
        dataset.create_schema(db)
        key = make_key(db)
        growth = {}
        for size in sizes:
            figures.setdefault("build_seconds", 0.0)
            figures["build_seconds"] += dataset.grow(db, size)
            svc = service.start("wsgi:app", db.url, workdir / f"check-{size}.log")
            try:
                growth[size] = measure_check(db, svc, key, check_size, runs, rng)
            finally:
                svc.stop()
        figures["check"] = growth[subscribers]
        figures["check"]["recipients"] = check_size
        figures["check_growth"] = {str(size): growth[size]["ours"] for size in sizes}
        # the driver's own lookup at each size, beside it: how much the database alone grew
        figures["check_growth_floor"] = {str(size): growth[size]["floor"] for size in sizes}
        figures["one_click"] = measure_one_click(db, runs, 1 if quick else 20, 16, workdir, rng)
        dataset.suppress_everyone(db)
        svc = service.start("wsgi:app", db.url, workdir / "export.log")
        try:
            figures["export"] = measure_export(db, svc, key, runs)
            figures["sync"] = measure_sync(db, svc, key, runs, 1000 if quick else 10_000)
            figures["memory_mb"] = max(service.rss_mb(pid) for pid in svc.workers())
        finally:
            svc.stop()
    figures["import"] = measure_import(kind, subscribers, runs, workdir)
    figures["overview"] = measure_overview(kind, subscribers, runs, workdir)
    return figures


def rows(figures: dict[str, Any]) -> list[tuple[str, str, str, str, str, bool | None]]:
    """Return the table: figure, measured (median [min–max]), floor, ratio, target, met (None: no target)."""
    c, g, o, e, s = (figures[k] for k in ("check", "check_growth", "one_click", "export", "sync"))
    n = c["recipients"]
    check_ratio = c["ours"]["median"] / c["floor"]["median"]
    per_second = n / c["ours"]["median"]
    sizes = sorted(g, key=int)
    growth = g[sizes[-1]]["median"] / g[sizes[0]]["median"]
    click_ratio = o["ours_rps"]["median"] / o["floor_rps"]["median"]
    export_ratio = e["ours"]["median"] / e["floor"]["median"]
    sync_ratio = s["ours"]["median"] / s["floor"]["median"]
    i = figures["import"]
    import_ratio = i["ours"]["median"] / i["floor"]["median"]

    lookups = figures.get("check_growth_floor")
    lookup_growth = ""
    if lookups:  # absent from runs written before it was measured
        each = " / ".join(f"{lookups[k]['median'] * 1000:.0f}" for k in sizes)
        grew = lookups[sizes[-1]]["median"] / lookups[sizes[0]]["median"]
        lookup_growth = f" (the driver's lookup: {each} ms, {grew:.2f}×)"

    def span(x: dict[str, float], scale: float = 1.0, fmt: str = "{:.0f}") -> str:
        return f"{fmt.format(x['median'] * scale)} [{fmt.format(x['min'] * scale)}–{fmt.format(x['max'] * scale)}]"

    return [
        ("check", f"{span(c['ours'], 1000)} ms ({per_second:,.0f} rcpt/s)", f"{c['floor']['median'] * 1000:.0f} ms",
         f"{check_ratio:.2f}×", "≤ 4× and ≥ 100,000 rcpt/s", check_ratio <= 4 and per_second >= 100_000),
        ("check growth", " / ".join(f"{g[k]['median'] * 1000:.0f}" for k in sizes) + f" ms at {' / '.join(sizes)} subscribers"
         + lookup_growth,
         f"{g[sizes[0]]['median'] * 1000:.0f} ms", f"{growth:.2f}×", "< 1.5×", growth < 1.5),
        ("one-click", f"{span(o['ours_rps'])} req/s, p99 {o['p99_ms']['median']:.1f} ms, {o['errors']} errors",
         f"{o['floor_rps']['median']:.0f} req/s, p99 {o['floor_p99_ms']['median']:.1f} ms", f"{click_ratio:.2f}×",
         "≥ 0.6×, p99 < 50 ms, 0 errors",
         click_ratio >= 0.6 and o["p99_ms"]["median"] < 50 and o["errors"] == 0),
        ("export", f"{span(e['ours'])} rows/s, RSS +{e['rss_growth_mb']['max']:.1f} MB ({e['rows']:,} rows)",
         f"{e['floor']['median']:.0f} rows/s", f"{export_ratio:.2f}×", "≥ 0.5×, RSS < +30 MB",
         export_ratio >= 0.5 and e["rss_growth_mb"]["max"] < 30),
        ("sync", f"{span(s['ours'])} rows/s ({s['rows']:,} changes)", f"{s['floor']['median']:.0f} rows/s",
         f"{sync_ratio:.2f}×", "≥ 0.5×", sync_ratio >= 0.5),
        ("memory", f"{figures['memory_mb']:.1f} MB per worker", "—", "—", "< 80 MB", figures["memory_mb"] < 80),
        # issue 7 sets the import's speed on SQLite; PostgreSQL's is measured and shown, no target
        ("import", f"{span(i['ours'])} rows/s ({i['ours_per_cpu_second']['median']:,.0f} a CPU-second; {i['rows']:,} rows)",
         f"{i['floor']['median']:.0f} rows/s", f"{import_ratio:.2f}×",
         "≥ 20,000 rows/s" if figures["db"] == "sqlite" else "none (20,000 rows/s is SQLite's)",
         i["ours"]["median"] >= 20_000 if figures["db"] == "sqlite" else None),
        *_overview_rows(figures),
    ]  # fmt: skip


def _overview_rows(figures: dict[str, Any]) -> list[tuple[str, str, str, str, str, bool | None]]:
    v = figures.get("overview")
    if v is None:  # runs written before the overview was measured
        return []
    others = " · ".join(
        f"{path.rsplit('/', 1)[1]} {s['median'] * 1000:.0f}" for path, s in v["others"].items()
    )
    measured = (
        f"{v['page']['median'] * 1000:.0f} [{v['page']['min'] * 1000:.0f}–{v['page']['max'] * 1000:.0f}] ms,"
        f" {v['bytes'] / 1000:.0f} kB ({others} ms) at {v['subscribers']:,} subscribers, {v['events']:,} events,"
        f" {v['open_requests']:,} open requests (built in {v['build_seconds']:.0f} s,"
        f" counted once in {v['build']['count']:.1f} s)"
    )
    timeout = ", statement_timeout 300 ms" if figures["db"] == "postgresql" else ""
    return [("overview", measured, "—", "—", f"/admin < 300 ms{timeout}", v["page"]["median"] < 0.3)]


def table(figures: dict[str, Any]) -> str:
    """Return the results as a Markdown table."""
    lines = [
        f"{figures['db']}, {figures['subscribers']:,} subscribers{' (quick)' if figures['quick'] else ''}:",
        "",
        "| figure | measured: median [min–max] | floor | ratio | target | met |",
        "|---|---|---|---|---|---|",
    ]
    for name, measured, floor, ratio, target, met in rows(figures):
        verdict = "—" if met is None else "yes" if met else "NO"
        lines.append(f"| {name} | {measured} | {floor} | {ratio} | {target} | {verdict} |")
    return "\n".join(lines)


def machine() -> dict[str, Any]:
    """Describe the machine the figures come from."""
    memory = next(
        line for line in Path("/proc/meminfo").read_text().splitlines() if line.startswith("MemTotal")
    )
    return {"cores": os.cpu_count(), "memory_gib": round(int(memory.split()[1]) / 1024**2, 1)}


def main(argv: list[str] | None = None) -> int:
    """Run the harness and print one table per database."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument(
        "--db", choices=("sqlite", "postgresql"), action="append", help="repeat for both (default: sqlite)"
    )
    parser.add_argument(
        "--subscribers", type=int, default=None, help="data set size (default 1,000,000; quick: 3,000)"
    )
    parser.add_argument(
        "--quick", action="store_true", help="a small data set and short runs, so the harness cannot rot"
    )
    args = parser.parse_args(argv)
    if shutil.which("wrk") is None:
        parser.error("wrk is needed: apt-get install -y wrk")
    kinds = args.db or ["sqlite"]
    subscribers = args.subscribers or (3000 if args.quick else 1_000_000)
    report: dict[str, Any] = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    report.update({"date": datetime.now(UTC).strftime("%Y-%m-%d"), "machine": machine()})
    tables = []
    with tempfile.TemporaryDirectory(prefix="prefs-bench-") as tmp:
        for kind in kinds:
            figures = run(kind, subscribers, args.quick, Path(tmp))
            figures["rows"] = [
                dict(zip(("figure", "measured", "floor", "ratio", "target", "met"), r, strict=True))
                for r in rows(figures)
            ]
            report.setdefault("results", {})[f"quick-{kind}" if args.quick else kind] = figures
            tables.append(table(figures))
            print(tables[-1], flush=True)
    if not args.quick:
        RESULTS.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\n{report['date']}, {report['machine']['cores']} cores, {report['machine']['memory_gib']} GiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
