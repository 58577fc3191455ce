"""Offline JSON schemas for kubeconform, from the sources a Go module proxy serves.

kubeconform fetches its schemas from a GitHub repository by default, which a machine that
reaches only package registries cannot. scripts/install.sh downloads, at pinned versions,
Kubernetes' own OpenAPI document (``api/openapi-spec/swagger.json`` of the
``k8s.io/kubernetes`` module) and the CustomResourceDefinitions the chart renders objects of
(prometheus-operator's and KEDA's, from their modules), and this script writes them in the
two layouts kubeconform reads with ``-schema-location``:

  <out>/<k8s version>-standalone-strict/<kind><kind suffix>.json   the Kubernetes kinds, as
      kubeconform's default template names them (``deployment-apps-v1.json``, ``service-v1.json``)
  <out>/crds/<group>/<kind>_<version>.json                          each CRD version

Every schema is standalone (references inlined) and strict: an object that lists its
properties refuses any other (``additionalProperties: false``), so a misspelt field fails
validation instead of being ignored, as ``kubeconform -strict`` expects.

    python deploy/helm/kubeconform_schemas.py --out DIR --kubernetes-version v1.34.3 \\
        --swagger swagger.json --crd a.yaml --crd b.yaml ...
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

REF_PREFIX = "#/definitions/"
INT_OR_STRING = {"oneOf": [{"type": "string"}, {"type": "integer"}]}
# resource.Quantity is typed "string" in the OpenAPI document, yet the API server accepts
# plain numbers (cpu: 1), and so does every manifest in the wild.
QUANTITY = "io.k8s.apimachinery.pkg.api.resource.Quantity"
NUMBER_OR_STRING = {"oneOf": [{"type": "string"}, {"type": "number"}]}

Schema = dict[str, Any]


def kind_suffix(api_version: str) -> str:
    """kubeconform's ``{{ .KindSuffix }}``: ``-<first label of the group>-<version>``, or
    ``-<version>`` for the core group (pkg/registry/registry.go)."""
    group_parts = api_version.split("/")
    suffix = "-" + group_parts[0].split(".")[0].lower()
    if len(group_parts) > 1:
        suffix += "-" + group_parts[1].lower()
    return suffix


class Expander:
    """Inlines the swagger document's ``$ref``s; a definition met again inside itself (only
    the recursive JSONSchemaProps of apiextensions) becomes an open schema."""

    def __init__(self, definitions: dict[str, Schema]) -> None:
        self.definitions = definitions
        self.cache: dict[str, Schema] = {}

    def definition(self, name: str, stack: tuple[str, ...] = ()) -> Schema:
        if name in stack:
            return {}
        if name not in self.cache:
            if name == QUANTITY:
                expanded: Schema = copy.deepcopy(NUMBER_OR_STRING)
            else:
                expanded = self.node(self.definitions[name], (*stack, name))
            self.cache[name] = expanded
        return self.cache[name]

    def node(self, node: Any, stack: tuple[str, ...]) -> Any:
        if isinstance(node, list):
            return [self.node(item, stack) for item in node]
        if not isinstance(node, dict):
            return node
        if isinstance(node.get("$ref"), str):
            target = self.definition(node["$ref"].removeprefix(REF_PREFIX), stack)
            merged = dict(target)
            if "description" in node:
                merged["description"] = node["description"]
            return merged
        if node.get("format") == "int-or-string":
            return {**copy.deepcopy(INT_OR_STRING), "description": node.get("description", "")}
        out = {key: self.node(value, stack) for key, value in node.items()}
        if "properties" in out and "additionalProperties" not in out:
            out["additionalProperties"] = False
        return out


def kubernetes_schemas(swagger: Schema) -> Iterator[tuple[str, Schema]]:
    """(file name, schema) of every kind the document names exactly one group-version-kind
    for; the shared meta types (DeleteOptions, WatchEvent: one per group) are no manifests."""
    definitions: dict[str, Schema] = swagger["definitions"]
    expander = Expander(definitions)
    seen: dict[str, str] = {}
    for name in sorted(definitions):
        gvks = definitions[name].get("x-kubernetes-group-version-kind", [])
        if len(gvks) != 1:
            continue
        gvk = gvks[0]
        api_version = f"{gvk['group']}/{gvk['version']}" if gvk["group"] else gvk["version"]
        file_name = f"{gvk['kind'].lower()}{kind_suffix(api_version)}.json"
        if file_name in seen:
            raise SystemExit(f"{file_name}: both {seen[file_name]} and {name}")
        seen[file_name] = name
        schema = copy.deepcopy(expander.definition(name))
        properties = schema.setdefault("properties", {})
        properties["apiVersion"] = {"type": "string", "enum": [api_version]}
        properties["kind"] = {"type": "string", "enum": [gvk["kind"]]}
        yield file_name, schema


def strict_crd_node(node: Any) -> Any:
    """A CRD's structural schema as strict JSON schema: closed objects, int-or-string and
    ``nullable`` spelt the JSON-schema way."""
    if isinstance(node, list):
        return [strict_crd_node(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {key: strict_crd_node(value) for key, value in node.items()}
    if out.get("x-kubernetes-int-or-string"):
        return {**copy.deepcopy(INT_OR_STRING), "description": out.get("description", "")}
    if out.pop("nullable", False) and isinstance(out.get("type"), str):
        out["type"] = [out["type"], "null"]
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


def crd_schemas(document: Schema) -> Iterator[tuple[str, Schema]]:
    """(relative path, schema) of each version a CustomResourceDefinition serves."""
    if document.get("kind") != "CustomResourceDefinition":
        return
    spec = document["spec"]
    group, kind = spec["group"], spec["names"]["kind"]
    for version in spec["versions"]:
        schema = strict_crd_node(version["schema"]["openAPIV3Schema"])
        properties = schema.setdefault("properties", {})
        properties["apiVersion"] = {"type": "string", "enum": [f"{group}/{version['name']}"]}
        properties["kind"] = {"type": "string", "enum": [kind]}
        yield f"{group}/{kind.lower()}_{version['name']}.json", schema


def write(path: Path, schema: Schema) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(schema, separators=(",", ":"), sort_keys=True), encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--out", type=Path, required=True, help="directory to write into")
    parser.add_argument("--kubernetes-version", required=True, help="e.g. v1.34.3")
    parser.add_argument("--swagger", type=Path, required=True, help="Kubernetes swagger.json")
    parser.add_argument("--crd", type=Path, action="append", default=[], help="CRD YAML file")
    args = parser.parse_args(argv)

    swagger = json.loads(args.swagger.read_text(encoding="utf-8"))
    core_dir = args.out / f"{args.kubernetes_version}-standalone-strict"
    count = 0
    for file_name, schema in kubernetes_schemas(swagger):
        write(core_dir / file_name, schema)
        count += 1
    crds = 0
    for crd_file in args.crd:
        for document in yaml.safe_load_all(crd_file.read_text(encoding="utf-8")):
            for relative, schema in crd_schemas(document or {}):
                write(args.out / "crds" / relative, schema)
                crds += 1
    if not count or not crds:
        print(f"no schemas found ({count} Kubernetes kinds, {crds} CRD versions)", file=sys.stderr)
        return 1
    print(f"{count} Kubernetes kinds, {crds} CRD versions in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
