"""Does one JSON Schema accept every value another accepts? A structural comparison.

``accepts(wide, narrow)`` walks two schemas side by side and lists each place where ``narrow``
allows a value ``wide`` refuses: a type, an enum value, a bound, a required property, a
variant (``anyOf``/``oneOf`` branch) with no counterpart. It is made for comparing Conduit's
OpenAPI document with OpenAI's (``tests/unit/test_openai_agreement.py``) and understands the
keywords both use; it is conservative where it cannot tell (a ``pattern`` it cannot compare
is a difference), never silent.

Properties ``narrow`` names and ``wide`` does not are not differences when ``wide`` takes
unknown properties: they are listed in ``Comparison.passed_through`` (the gateway passes them
to the engine unvalidated).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

Schema = dict[str, Any] | bool

_ANY_TYPE = {"null", "boolean", "object", "array", "number", "integer", "string"}


@dataclass
class Document:
    """Schemas that refer to each other by ``$ref`` under ``prefix`` (``#/$defs/``, ``#/components/schemas/``)."""

    schemas: dict[str, Any]
    prefix: str

    def resolve(self, schema: Schema) -> tuple[Schema, str | None]:
        """The schema a ``$ref`` points to (following chains) and the last name on the way."""
        name = None
        while isinstance(schema, dict) and "$ref" in schema:
            ref = schema["$ref"]
            if not ref.startswith(self.prefix):
                raise ValueError(f"unsupported $ref {ref!r}")
            name = ref[len(self.prefix):]
            rest = {k: v for k, v in schema.items() if k != "$ref"}
            schema = self.schemas[name]
            if _constraining(rest):
                schema = _merge(schema, rest) if isinstance(schema, dict) else schema
        return schema, name


@dataclass
class Comparison:
    #: "path: what" -> detail, for every value narrow allows that wide refuses.
    differences: dict[str, str] = field(default_factory=dict)
    #: Paths of properties narrow names that wide takes only as unknown properties.
    passed_through: set[str] = field(default_factory=set)


_ANNOTATIONS = {"title", "description", "default", "examples", "deprecated", "readOnly", "writeOnly", "$comment",
                "format", "contentMediaType", "contentEncoding"}


def _constraining(schema: dict[str, Any]) -> bool:
    return any(k not in _ANNOTATIONS and not k.startswith("x-") for k in schema)


def _merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out = dict(a)
    for key, value in b.items():
        if key == "properties":
            out["properties"] = {**out.get("properties", {}), **value}
        elif key == "required":
            out["required"] = sorted(set(out.get("required", [])) | set(value))
        elif key == "type" and "type" in out:
            left = set(_as_list(out["type"]))
            right = set(_as_list(value))
            out["type"] = sorted(left & right | ({"integer"} if "integer" in left | right and "number" in left | right
                                                 else set()))
        else:
            out[key] = value
    return out


def _as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


def branches(doc: Document, schema: Schema, label: str | None = None) -> list[tuple[str | None, Schema]]:
    """The alternatives a schema allows: ``anyOf``/``oneOf`` flattened, ``allOf`` merged, refs
    resolved; each labelled with the component it came from, if any."""
    schema, name = doc.resolve(schema)
    label = name or label
    if not isinstance(schema, dict):
        return [(label, schema)]
    if "allOf" in schema:
        merged: dict[str, Any] = {k: v for k, v in schema.items() if k != "allOf"}
        for part in schema["allOf"]:
            alternatives = branches(doc, part)
            if len(alternatives) != 1 or not isinstance(alternatives[0][1], dict):
                raise ValueError(f"allOf with alternatives in {label}: not supported")
            merged = _merge(alternatives[0][1], merged)
        return branches(doc, merged, label)
    for key in ("anyOf", "oneOf"):
        if key in schema:
            rest = {k: v for k, v in schema.items() if k not in ("anyOf", "oneOf", "discriminator")}
            out: list[tuple[str | None, Schema]] = []
            for sub in schema[key]:
                for sub_label, b in branches(doc, sub, None):
                    if isinstance(b, dict) and _constraining(rest):
                        b = _merge(rest, b)
                    out.append((sub_label or label, b))
            return out
    return [(label, schema)]


def _types(schema: dict[str, Any]) -> set[str]:
    if "type" in schema:
        types = set(_as_list(schema["type"]))
    elif "enum" in schema or "const" in schema:
        types = {_type_of(v) for v in _enum(schema) or []}
    else:
        types = set(_ANY_TYPE)
    if "number" in types:
        types.add("integer")
    return types


def _type_of(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    return "array" if isinstance(value, list) else "object"


def _enum(schema: dict[str, Any]) -> list[Any] | None:
    if "const" in schema:
        return [schema["const"]]
    return schema.get("enum")


def _bounds(schema: dict[str, Any], integer: bool) -> tuple[float, float]:
    lo, hi = schema.get("minimum", -math.inf), schema.get("maximum", math.inf)
    if "exclusiveMinimum" in schema:
        x = schema["exclusiveMinimum"]
        lo = max(lo, math.floor(x) + 1 if integer else math.nextafter(x, math.inf))
    if "exclusiveMaximum" in schema:
        x = schema["exclusiveMaximum"]
        hi = min(hi, math.ceil(x) - 1 if integer else math.nextafter(x, -math.inf))
    return lo, hi


#: What one comparison found: differences (path: kind -> detail), and properties passed through.
_Found = tuple[dict[str, str], set[str]]


class _Walker:
    def __init__(self, wide: Document, narrow: Document) -> None:
        self.wide = wide
        self.narrow = narrow
        self._seen: set[tuple[int, int]] = set()

    def accepts(self, w: Schema, n: Schema, path: str) -> _Found:
        """Where ``n`` allows what ``w`` refuses, and what ``w`` only passes through."""
        wb = branches(self.wide, w)
        nbs = branches(self.narrow, n)
        out: dict[str, str] = {}
        passed: set[str] = set()
        for label, nb in nbs:
            where = f"{path}<{label}>" if label and len(nbs) > 1 else path
            # The closest wide variant: of the same type and tag (a discriminating enum) if any,
            # then the one with the fewest differences.
            best: tuple[tuple[bool, bool, int], _Found] | None = None
            for _, candidate in wb:
                found = self._single(candidate, nb, where)
                diffs = found[0]
                rank = (f"{where}: type" in diffs,
                        any(k.endswith(": enum") and k.count(".") == where.count(".") + 1 for k in diffs), len(diffs))
                if best is None or rank < best[0]:
                    best = (rank, found)
                if not diffs:
                    break
            if best is None:
                out[f"{where}: variant"] = "no counterpart"
            else:
                out.update(best[1][0])
                passed |= best[1][1]
        return out, passed

    def _single(self, w: Schema, n: Schema, path: str) -> _Found:
        if w is True or w == {} or (isinstance(w, dict) and not _constraining(w)):
            return {}, set()
        if n is False:
            return {}, set()
        if w is False:
            return {f"{path}: refused": "wide allows nothing here"}, set()
        assert isinstance(w, dict) and isinstance(n, dict)
        key = (id(w), id(n))
        if key in self._seen:
            return {}, set()
        self._seen.add(key)
        try:
            return self._compare(w, n, path)
        finally:
            self._seen.discard(key)

    def _compare(self, w: dict[str, Any], n: dict[str, Any], path: str) -> _Found:
        out: dict[str, str] = {}
        passed: set[str] = set()
        tw, tn = _types(w), _types(n)
        if not tn <= tw:
            return {f"{path}: type": f"{sorted(tn - tw)} not accepted (accepts {sorted(tw)})"}, passed
        ew, en = _enum(w), _enum(n)
        if ew is not None:
            if en is None:
                return {f"{path}: enum": f"only {sorted(map(str, ew))} accepted"}, passed
            extra = [v for v in en if v not in ew]
            if extra:
                return {f"{path}: enum": f"{sorted(map(str, extra))} not accepted"}, passed
            return {}, passed
        if en is not None:
            return {}, passed  # every value of the narrow enum is of a type wide takes (bounds aside)
        if tn & {"integer", "number"}:
            integer = "number" not in _as_list(n.get("type", "number"))
            (wl, wh), (nl, nh) = _bounds(w, integer), _bounds(n, integer)
            if nl < wl or nh > wh:
                out[f"{path}: range"] = f"[{nl}, {nh}] not within [{wl}, {wh}]"
        if "string" in tn:
            if n.get("minLength", 0) < w.get("minLength", 0):
                out[f"{path}: minLength"] = f"{n.get('minLength', 0)} < {w['minLength']}"
            if n.get("maxLength", math.inf) > w.get("maxLength", math.inf):
                out[f"{path}: maxLength"] = f"{n.get('maxLength', 'none')} > {w['maxLength']}"
            if "pattern" in w and w["pattern"] != n.get("pattern"):
                out[f"{path}: pattern"] = f"{n.get('pattern')!r} vs {w['pattern']!r}"
        if "array" in tn:
            if n.get("minItems", 0) < w.get("minItems", 0):
                out[f"{path}: minItems"] = f"{n.get('minItems', 0)} < {w['minItems']}"
            if n.get("maxItems", math.inf) > w.get("maxItems", math.inf):
                out[f"{path}: maxItems"] = f"{n.get('maxItems', 'none')} > {w['maxItems']}"
            if "items" in w:
                self._add(self.accepts(w["items"], n.get("items", True), f"{path}[]"), out, passed)
        if "object" in tn:
            self._add(self._objects(w, n, path), out, passed)
        return out, passed

    @staticmethod
    def _add(found: _Found, out: dict[str, str], passed: set[str]) -> None:
        out.update(found[0])
        passed |= found[1]

    def _objects(self, w: dict[str, Any], n: dict[str, Any], path: str) -> _Found:
        out: dict[str, str] = {}
        passed: set[str] = set()
        dot = f"{path}." if path else ""
        for name in sorted(set(w.get("required", [])) - set(n.get("required", []))):
            out[f"{dot}{name}: required"] = "required by the wide schema only"
        wp, np_ = w.get("properties", {}), n.get("properties", {})
        w_extra = w.get("additionalProperties", True)
        for name in sorted(np_):
            if name in wp:
                self._add(self.accepts(wp[name], np_[name], f"{dot}{name}"), out, passed)
            elif w_extra is False:
                out[f"{dot}{name}: refused"] = "an unknown property to the wide schema"
            elif w_extra is True or w_extra == {}:
                passed.add(f"{dot}{name}")
            else:
                self._add(self.accepts(w_extra, np_[name], f"{dot}{name}"), out, passed)
        n_extra = n.get("additionalProperties", True)
        if n_extra is not False and w_extra is not True and w_extra != {}:
            if n_extra is True or n_extra == {}:
                if w_extra is False or _constraining(w_extra):
                    out[f"{dot}{{}}: additionalProperties"] = "any other property allowed by the narrow schema"
            else:
                self._add(self.accepts(w_extra, n_extra, f"{dot}{{}}"), out, passed)
        return out, passed


def compare(wide: Document, wide_name: str, narrow: Document, narrow_name: str) -> Comparison:
    """Where the component ``narrow_name`` allows what ``wide_name`` refuses."""
    differences, passed = _Walker(wide, narrow).accepts({"$ref": wide.prefix + wide_name},
                                                        {"$ref": narrow.prefix + narrow_name}, "")
    # A property of a variant wide refuses anyway is not passed through.
    refused = {key.split(": ")[0].rpartition(">")[0] + ">" for key in differences if ">" in key.split(": ")[0]}
    passed = {p for p in passed if not any(p.startswith(prefix) for prefix in refused)}
    return Comparison(differences=differences, passed_through=passed)


def property_names(doc: Document, name: str) -> set[str]:
    """Every property name anywhere in a component and the components it refers to."""
    names: set[str] = set()
    seen: set[str] = set()
    todo: list[Any] = [{"$ref": doc.prefix + name}]
    while todo:
        node = todo.pop()
        if isinstance(node, list):
            todo.extend(node)
        elif isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str):
                target = ref[len(doc.prefix):]
                if target not in seen:
                    seen.add(target)
                    todo.append(doc.schemas[target])
            for key, value in node.items():
                if key == "properties" and isinstance(value, dict):
                    names.update(value)
                    todo.extend(value.values())
                elif key != "$ref":
                    todo.append(value)
    return names
