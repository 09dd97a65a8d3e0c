"""UI-format ComfyUI workflow (what the frontend loads and saves: "nodes" + "links") -> API-format prompt (what
`POST /prompt` takes: {node_id: {"class_type", "inputs"}}), validated against a server's `GET /object_info`.

No ComfyUI import: only the workflow JSON and the object_info JSON. Used by tests/test_server_comfy.py; usable by hand:

    python tests/workflow_api.py workflows/erase_style.json http://127.0.0.1:8188 > prompt.json

What the frontend does, and this module mirrors (ComfyUI frontend, `useIntWidget` / `useComboWidget` /
`LGraphNode.serialize`):
- `widgets_values` holds one value per widget in the order of the node definition's inputs (object_info
  `input_order`: required, then optional), skipping socket-only inputs (MODEL, CLIP, ... or `forceInput`).
- A widget with a "control after generate" companion stores the companion's value ("fixed", "increment",
  "decrement", "randomize") right after its own. INT widgets get one when the input says
  `control_after_generate: true`, or says nothing and is named `seed` / `noise_seed`; COMBO widgets only when the
  input says so. Upload inputs (`image_upload`, ...) add an "upload" widget, also stored.
- A linked input (socket, or a widget converted to an input) takes its value from the link: [source_id, slot].
- Frontend-only nodes: Note / MarkdownNote (ignored), Reroute (followed to its source), PrimitiveNode (its value
  replaces the link). Muted nodes (mode 2) are left out; bypassed ones (mode 4) pass their input of the same type
  through.

Validation (raises WorkflowError, naming the node): a node type that /object_info does not list (missing custom
node pack), a widgets_values count that does not match the definition, a control value where none belongs (the
values are shifted), a link to an input or output slot the node does not have, a required socket left unconnected.
"""
from __future__ import annotations

import json
import sys

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
CONTROL_VALUES = {"fixed", "increment", "decrement", "randomize"}
UPLOAD_OPTIONS = ("image_upload", "video_upload", "audio_upload", "animated_image_upload", "model_upload")
IGNORED_TYPES = {"Note", "MarkdownNote"}
MODE_MUTED, MODE_BYPASS = 2, 4


class WorkflowError(ValueError):
    """The workflow does not fit the server's node definitions."""


def _spec(entry):
    """(type, options) from an object_info input entry: ["INT", {...}], [["a", "b"], {...}], ["MODEL"]."""
    kind = entry[0]
    opts = entry[1] if len(entry) > 1 and isinstance(entry[1], dict) else {}
    return kind, opts


def is_widget(entry) -> bool:
    kind, opts = _spec(entry)
    if opts.get("forceInput"):
        return False
    return isinstance(kind, list) or kind in WIDGET_TYPES


def has_control(name: str, entry) -> bool:
    """Whether the frontend adds a control_after_generate companion widget (its value is stored after this one)."""
    kind, opts = _spec(entry)
    control = opts.get("control_after_generate")
    if kind == "INT":
        return bool(control) if control is not None else name in ("seed", "noise_seed")
    if isinstance(kind, list) or kind == "COMBO":
        return bool(control)
    return False


def ordered_inputs(info: dict) -> list[tuple[str, list, bool]]:
    """(name, entry, required) for every input of a node definition, in definition order (hidden ones excluded)."""
    spec = info.get("input", {})
    order = info.get("input_order") or {k: list(v) for k, v in spec.items() if k in ("required", "optional")}
    out = []
    for section in ("required", "optional"):
        for name in order.get(section, []):
            entry = spec.get(section, {}).get(name)
            if entry is not None:
                out.append((name, entry, section == "required"))
    return out


def widget_layout(info: dict) -> list[tuple[str, str]]:
    """The widgets_values layout of a node: (input name, "value" | "control" | "upload") per stored value."""
    layout = []
    for name, entry, _ in ordered_inputs(info):
        if not is_widget(entry):
            continue
        layout.append((name, "value"))
        if has_control(name, entry):
            layout.append((name, "control"))
        if any(_spec(entry)[1].get(k) for k in UPLOAD_OPTIONS):
            layout.append((name, "upload"))
    return layout


def _links_by_id(workflow: dict) -> dict:
    """link id -> (origin node id, origin slot, target node id, target slot); both serialisations (list or dict)."""
    out = {}
    for link in workflow.get("links") or []:
        if isinstance(link, dict):
            out[link["id"]] = (link["origin_id"], link["origin_slot"], link["target_id"], link["target_slot"])
        else:
            out[link[0]] = (link[1], link[2], link[3], link[4])
    return out


def _describe(node: dict) -> str:
    title = node.get("title")
    return f"node {node.get('id')} ({node.get('type')}{', ' + repr(title) if title else ''})"


def ui_to_api(workflow: dict, object_info: dict) -> dict:
    """Convert a UI-format workflow to an API-format prompt, validating it against `object_info`."""
    if "nodes" not in workflow:
        raise WorkflowError("not a UI-format workflow (no 'nodes'); API-format prompts need no conversion")
    if workflow.get("definitions", {}).get("subgraphs"):
        raise WorkflowError("workflows with subgraphs are not supported by this converter")
    nodes = {n["id"]: n for n in workflow["nodes"]}
    links = _links_by_id(workflow)

    def resolve(link_id, seen=()):
        """Where a link's value comes from: ("link", [node_id, slot]) or ("value", v), or None (muted source)."""
        if link_id not in links:
            raise WorkflowError(f"link {link_id} is referenced but not in 'links'")
        origin, slot = links[link_id][0], links[link_id][1]
        src = nodes.get(origin)
        if src is None:
            raise WorkflowError(f"link {link_id} comes from node {origin}, which is not in 'nodes'")
        if origin in seen:
            raise WorkflowError(f"link {link_id}: cycle through Reroute/bypassed nodes at {_describe(src)}")
        kind = src["type"]
        if kind == "Reroute":
            upstream = (src.get("inputs") or [{}])[0].get("link")
            if upstream is None:
                raise WorkflowError(f"{_describe(src)} has no input connected")
            return resolve(upstream, seen + (origin,))
        if kind == "PrimitiveNode":
            values = src.get("widgets_values") or []
            if not values:
                raise WorkflowError(f"{_describe(src)} has no value (widgets_values is empty)")
            return ("value", values[0])
        if kind in IGNORED_TYPES:
            raise WorkflowError(f"link {link_id} comes from {_describe(src)}, which has no outputs")
        if src.get("mode") == MODE_MUTED:
            return None
        if src.get("mode") == MODE_BYPASS:
            out_type = (src.get("outputs") or [])[slot].get("type") if slot < len(src.get("outputs") or []) else None
            for inp in src.get("inputs") or []:
                if inp.get("link") is not None and inp.get("type") == out_type:
                    return resolve(inp["link"], seen + (origin,))
            return None
        info = object_info.get(kind)
        if info is None:
            raise WorkflowError(f"{_describe(src)}: unknown node type '{kind}' (not in /object_info)")
        if not 0 <= slot < len(info.get("output", [])):
            raise WorkflowError(f"link {link_id} uses output slot {slot} of {_describe(src)}, which has "
                                f"{len(info.get('output', []))} outputs")
        return ("link", [str(origin), slot])

    prompt = {}
    for node in sorted(workflow["nodes"], key=lambda n: n.get("order", 0)):
        kind = node.get("type")
        if kind in IGNORED_TYPES or kind in ("Reroute", "PrimitiveNode"):
            continue
        if node.get("mode") in (MODE_MUTED, MODE_BYPASS):
            continue
        info = object_info.get(kind)
        if info is None:
            raise WorkflowError(f"{_describe(node)}: unknown node type '{kind}': /object_info does not list it "
                                f"(is its custom node pack installed and did it import without errors?)")
        inputs: dict = {}
        defined = {name: (entry, required) for name, entry, required in ordered_inputs(info)}

        # widget values, in definition order
        layout = widget_layout(info)
        values = node.get("widgets_values")
        if values is None:
            values = []
        if isinstance(values, dict):  # some packs serialise widgets by name
            for name, role in layout:
                if role == "value" and name in values:
                    inputs[name] = values[name]
        else:
            if len(values) != len(layout):
                raise WorkflowError(
                    f"{_describe(node)}: widgets_values has {len(values)} values, the node definition has "
                    f"{len(layout)} widget values: {[n if r == 'value' else f'{n}:{r}' for n, r in layout]} "
                    f"(got {values!r})")
            for (name, role), value in zip(layout, values):
                if role == "value":
                    inputs[name] = value
                elif role == "control" and value not in CONTROL_VALUES:
                    raise WorkflowError(
                        f"{_describe(node)}: the value after widget '{name}' should be its control_after_generate "
                        f"mode ({', '.join(sorted(CONTROL_VALUES))}), got {value!r}: widgets_values are shifted")

        # links: sockets, and widgets converted to inputs (their link wins over the stored value)
        for slot, inp in enumerate(node.get("inputs") or []):
            name = (inp.get("widget") or {}).get("name") or inp.get("name")
            if name not in defined:
                raise WorkflowError(f"{_describe(node)}: input slot {slot} '{name}' is not an input of {kind} "
                                    f"(inputs: {list(defined)})")
            if inp.get("link") is None:
                continue
            source = resolve(inp["link"])
            if source is None:
                inputs.pop(name, None)
            else:
                inputs[name] = source[1]
        for name, (entry, required) in defined.items():
            if required and not is_widget(entry) and name not in inputs:
                raise WorkflowError(f"{_describe(node)}: required input '{name}' ({_spec(entry)[0]}) is not "
                                    "connected")
        prompt[str(node["id"])] = {"class_type": kind, "inputs": inputs,
                                   "_meta": {"title": node.get("title") or info.get("display_name") or kind}}
    return prompt


def main(argv):
    if len(argv) != 3:
        print(__doc__.split("\n\n")[1], file=sys.stderr)
        return 2
    import urllib.request

    with open(argv[1], encoding="utf-8") as f:
        workflow = json.load(f)
    with urllib.request.urlopen(argv[2].rstrip("/") + "/object_info") as r:
        object_info = json.load(r)
    json.dump({"prompt": ui_to_api(workflow, object_info)}, sys.stdout, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
