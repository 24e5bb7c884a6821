"""Dash callback requests built the way the browser builds them: from the app's own callback map.

The page's JavaScript reads ``/_dash-dependencies`` (every callback's outputs, inputs and state) and
``/_dash-layout`` (each component's initial properties) and posts one ``/_dash-update-component`` per
callback. Building the benchmark's and the tests' requests from the same two documents means a callback
that gains an input (the table's severity filter did) is requested with it, instead of answering 500
to a hand-written body that lacks it.

``client`` is anything with ``get(path)`` / ``post(path, json=...)`` returning an object with
``status_code`` and ``json()`` or ``.json``: Flask's test client, or ``HttpClient`` below for a served app.
"""

from __future__ import annotations

import json as jsonlib
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

Prop = tuple[str, str]  # (component id, property)


@dataclass(frozen=True)
class Callback:
    """One entry of ``/_dash-dependencies``."""

    output: str
    outputs: list[Prop]
    inputs: list[Prop]
    state: list[Prop]

    def request(self, values: Mapping[Prop, Any], changed: Prop | None = None) -> dict[str, Any]:
        """The body of ``POST /_dash-update-component``; ``changed`` defaults to the first input.

        A property with no value in ``values`` is sent without one, as the browser sends a property the
        layout leaves unset (Dash passes None to the callback)."""

        def item(prop: Prop) -> dict[str, Any]:
            body: dict[str, Any] = {"id": prop[0], "property": prop[1]}
            if prop in values:
                body["value"] = values[prop]
            return body

        outs = [{"id": i, "property": p} for i, p in self.outputs]
        trigger = changed or self.inputs[0]
        return {
            "output": self.output,
            # Dash reads a list for a multi-output callback (its output key starts with "..").
            "outputs": outs if self.output.startswith("..") else outs[0],
            "inputs": [item(p) for p in self.inputs],
            "state": [item(p) for p in self.state],
            "changedPropIds": [f"{trigger[0]}.{trigger[1]}"],
        }


def _body(response: Any) -> Any:
    payload = response.json
    return payload() if callable(payload) else payload


def callbacks(client: Any) -> list[Callback]:
    response = client.get("/_dash-dependencies")
    if response.status_code != 200:
        raise RuntimeError(f"/_dash-dependencies answered {response.status_code}")

    def props(items: list[dict[str, Any]]) -> list[Prop]:
        return [(str(d["id"]), str(d["property"])) for d in items]

    out = []
    for dep in _body(response):
        key = dep["output"]
        parts = key.strip(".").split("...") if key.startswith("..") else [key]
        out.append(
            Callback(
                output=key,
                outputs=[(p.rsplit(".", 1)[0], p.rsplit(".", 1)[1]) for p in parts],
                inputs=props(dep["inputs"]),
                state=props(dep["state"]),
            )
        )
    return out


def _walk(node: Any) -> Iterator[dict[str, Any]]:
    if isinstance(node, list):
        for child in node:
            yield from _walk(child)
    elif isinstance(node, dict):
        if "props" in node and "type" in node:
            yield node["props"]
            for value in node["props"].values():
                yield from _walk(value)
        else:
            for value in node.values():
                yield from _walk(value)


def layout_values(client: Any) -> dict[Prop, Any]:
    """Every property the layout sets on a component with an id: what the browser starts from."""
    response = client.get("/_dash-layout")
    if response.status_code != 200:
        raise RuntimeError(f"/_dash-layout answered {response.status_code}")
    values: dict[Prop, Any] = {}
    for props in _walk(_body(response)):
        if isinstance(props.get("id"), str):
            values.update({(props["id"], k): v for k, v in props.items() if k not in ("id", "children")})
    return values


def find(all_callbacks: list[Callback], output: Prop) -> Callback:
    """The callback that writes ``output`` (a KeyError names it when the app has none)."""
    for cb in all_callbacks:
        if output in cb.outputs:
            return cb
    raise KeyError(f"no callback writes {output[0]}.{output[1]}")


@dataclass
class HttpResponse:
    status_code: int
    data: bytes

    def json(self) -> Any:
        return jsonlib.loads(self.data)


class HttpClient:
    """The two calls above over real HTTP (urllib), for an app served by gunicorn or Werkzeug."""

    def __init__(self, base_url: str, timeout_s: float = 60.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout_s = timeout_s

    def _send(self, request: urllib.request.Request) -> HttpResponse:
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as resp:
                return HttpResponse(resp.status, resp.read())
        except urllib.error.HTTPError as exc:
            return HttpResponse(exc.code, exc.read())

    def get(self, path: str) -> HttpResponse:
        return self._send(urllib.request.Request(self.base_url + path))

    def post(self, path: str, json: Any) -> HttpResponse:
        body = jsonlib.dumps(json).encode()
        return self._send(
            urllib.request.Request(
                self.base_url + path, data=body, headers={"content-type": "application/json"}
            )
        )
