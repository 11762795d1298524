"""The data funnel of a recipe's last run (``recipe show``), read from the store's manifests.

For every data stage (a stage with a ``documents`` input or output), from the artifact of its
current fingerprint, else from the one the recipe's index recorded last (an earlier
configuration of the stage: ``status`` ``earlier``), else nothing (``not run``):

* ``documents_in`` / ``documents_out``: the manifest's ``documents_in`` / ``documents_out``
  counts; else the input's and the output's ``meta.num_documents`` (``records_in`` for a
  source); ``bytes_in`` / ``bytes_out``: the input's and the output's ``meta.num_bytes``;
* ``reasons``: the counts that say why documents went (``dropped.*``, ``skipped.*``,
  ``<filter>.dropped.<reason>``, ``duplicates_removed``), largest first, zeros left out;
* ``languages``: ``meta.languages`` or the ``language.<lang>`` counts (``language_id``);
* ``clusters``: near-duplicate clusters (``meta.near_duplicate_clusters``: count and size
  histogram) or, for exact dedup, the duplicates removed and the distinct documents.

Only manifests are read: no artifact data, no ML framework.
"""
from __future__ import annotations

from typing import Any

from .store import Store
from .validate import Recipe

DOCUMENTS = "documents"


def _is_data_stage(spec: Any) -> bool:
    return spec.component.output == DOCUMENTS or any(
        spec.component.slot_kind(slot) == DOCUMENTS for slot in spec.component.inputs)


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def is_reason(key: str) -> bool:
    """Does a manifest count say why documents left a stage?"""
    return (key.startswith(("dropped.", "skipped.")) or ".dropped." in key
            or key == "duplicates_removed")


def _documents_out(manifest: dict[str, Any]) -> int | None:
    meta, counts, metrics = (manifest.get(k) or {} for k in ("meta", "counts", "metrics"))
    for value in (meta.get("num_documents"), counts.get("documents_out"),
                  metrics.get("documents_out"), metrics.get("documents")):
        if _int(value) is not None:
            return value
    return None


def stage_funnel(name: str, spec: Any, fp: str, status: str, manifest: dict[str, Any] | None,
                 upstream: dict[str, Any] | None) -> dict[str, Any]:
    """One stage's row: see the module docstring. ``upstream`` is the manifest of the stage's
    documents input (None for a source, or when it is not in the store)."""
    row: dict[str, Any] = {"stage": name, "component": spec.component.name, "fingerprint": fp,
                           "status": status, "output": spec.component.output,
                           "documents_in": None, "documents_out": None, "bytes_in": None,
                           "bytes_out": None, "kept_fraction": None, "reasons": [],
                           "languages": {}, "clusters": None, "counts": {}}
    if manifest is None:
        return row
    counts = {k: v for k, v in (manifest.get("counts") or {}).items() if _int(v) is not None}
    meta = manifest.get("meta") or {}
    up_meta = (upstream or {}).get("meta") or {}
    docs_in = _int(counts.get("documents_in"))
    if docs_in is None:
        docs_in = _int(up_meta.get("num_documents")) if upstream else _int(counts.get("records_in"))
    docs_out = _documents_out(manifest) if spec.component.output == DOCUMENTS else None
    row.update(documents_in=docs_in, documents_out=docs_out,
               bytes_in=_int(up_meta.get("num_bytes")),
               bytes_out=_int(meta.get("num_bytes")) if spec.component.output == DOCUMENTS else None,
               counts=counts)
    if docs_in and docs_out is not None:
        row["kept_fraction"] = round(docs_out / docs_in, 4)
    row["reasons"] = [{"reason": k, "count": v} for k, v in
                      sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
                      if v > 0 and is_reason(k)]
    languages = meta.get("languages")
    if not isinstance(languages, dict):
        languages = {k.removeprefix("language."): v for k, v in counts.items()
                     if k.startswith("language.") and v > 0}
    row["languages"] = dict(sorted(languages.items(), key=lambda kv: (-kv[1], kv[0])))
    near = meta.get("near_duplicate_clusters")
    if isinstance(near, dict):
        row["clusters"] = {"num_clusters": near.get("num_clusters"),
                           "size_histogram": near.get("size_histogram"),
                           "documents_removed": counts.get("dropped.near_duplicate")}
    elif "duplicates_removed" in counts:
        metrics = manifest.get("metrics") or {}
        row["clusters"] = {"documents_removed": counts["duplicates_removed"],
                           "distinct": metrics.get("distinct")}
    return row


def funnel(recipe: Recipe, fingerprints: dict[str, str], store: Store,
           stages: list[str] | None = None) -> dict[str, Any]:
    """The funnel of ``recipe``'s data stages (or of ``stages``, data stages or not)."""
    index = store.index(recipe.name)
    manifests: dict[str, dict[str, Any] | None] = {}
    rows = []
    for name, spec in recipe.stages.items():
        fp, status = fingerprints[name], "current"
        found = store.lookup(fp, report=False)
        if found is None and index.get(name) and index[name] != fp:
            fp, status = index[name], "earlier"
            found = store.lookup(fp, report=False)
        if found is None:
            fp, status = fingerprints[name], "not run"
        manifests[name] = found.manifest if found else None
        wanted = name in stages if stages else _is_data_stage(spec)
        if not wanted:
            continue
        slot = next((s for s in spec.component.inputs
                     if spec.component.slot_kind(s) == DOCUMENTS), None)
        up = spec.inputs.get(slot) if slot else None
        upstream = manifests.get(up) if isinstance(up, str) else None  # a list: no single one
        rows.append(stage_funnel(name, spec, fp, status, manifests[name], upstream))
    return {"recipe": recipe.name, "store": str(store.root), "stages": rows}


# -- the terminal view ---------------------------------------------------------------------


def _num(n: int | None) -> str:
    return "-" if n is None else f"{n:,}"


def _size(n: int | None) -> str:
    if n is None:
        return "-"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{n} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError


def _share(n: int, total: int | None) -> str:
    return f" ({100 * n / total:.1f}%)" if total else ""


def render(result: dict[str, Any], detail: bool = False, top: int = 3) -> str:
    """An aligned table, a few lines per stage: ``top`` drop reasons and languages (every
    one, and every count, with ``detail``)."""
    cols = ("STAGE", "COMPONENT", "STATUS", "DOCS IN", "DOCS OUT", "KEPT", "BYTES IN",
            "BYTES OUT")
    table = [cols] + [(r["stage"], r["component"], r["status"], _num(r["documents_in"]),
                       _num(r["documents_out"]),
                       "-" if r["kept_fraction"] is None else f"{100 * r['kept_fraction']:.1f}%",
                       _size(r["bytes_in"]), _size(r["bytes_out"]))
                      for r in result["stages"]]
    widths = [max(len(row[i]) for row in table) for i in range(len(cols))]
    left = 3  # STAGE, COMPONENT, STATUS are left-aligned, numbers right-aligned

    def line(row: tuple[str, ...]) -> str:
        return "  ".join(c.ljust(w) if i < left else c.rjust(w)
                         for i, (c, w) in enumerate(zip(row, widths))).rstrip()

    out = [f"recipe {result['recipe']}  (store {result['store']})", line(cols)]
    for r, row in zip(result["stages"], table[1:]):
        out.append(line(row))
        out += ["    " + s for s in _details(r, detail, top)]
    if not result["stages"]:
        out.append("(no data stages)")
    return "\n".join(out)


def _details(r: dict[str, Any], detail: bool, top: int) -> list[str]:
    if r["status"] == "not run":
        return ["not in the store: run the recipe first"]
    out = []
    if r["status"] == "earlier":
        out.append(f"from an earlier run ({r['fingerprint'][:12]}): the recipe changed since")
    reasons = r["reasons"] if detail else r["reasons"][:top]
    if reasons:
        width = max(len(x["reason"]) for x in reasons)
        digits = max(len(f"{x['count']:,}") for x in reasons)
        for x in reasons:
            out.append(f"{x['reason']:<{width}}  {x['count']:>{digits},}"
                       f"{_share(x['count'], r['documents_in'])}")
        if len(r["reasons"]) > len(reasons):
            out.append(f"... {len(r['reasons']) - len(reasons)} more reasons "
                       f"(recipe show RECIPE {r['stage']})")
    langs = list(r["languages"].items())
    if langs:
        total = sum(n for _, n in langs)
        shown = langs if detail else langs[:5]
        more = f", ... {len(langs) - len(shown)} more" if len(langs) > len(shown) else ""
        out.append("languages: " + ", ".join(f"{k} {n:,}{_share(n, total)}" for k, n in shown)
                   + more)
    c = r["clusters"]
    if c:
        if c.get("num_clusters") is not None:
            sizes = c.get("size_histogram") or {}
            hist = ", ".join(f"{n:,} of size {s}" for s, n in sizes.items())  # smallest first
            out.append(f"clusters: {c['num_clusters']:,}" + (f" ({hist})" if hist else "")
                       + (f", {c['documents_removed']:,} removed"
                          if c.get("documents_removed") is not None else ""))
        elif c.get("distinct") is not None:
            out.append(f"distinct texts: {c['distinct']:,}")
    if detail and r["counts"]:
        width = max(map(len, r["counts"]))
        digits = max(len(f"{v:,}") for v in r["counts"].values())
        out.append("counts:")
        out += [f"  {k:<{width}}  {v:>{digits},}" for k, v in r["counts"].items()]
    return out
