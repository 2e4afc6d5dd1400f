"""Validators for schemas of the server's OpenAPI document (server/src/http/openapi.json):
one schema for what the server accepts and what the pipeline sends."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

OPENAPI = Path(__file__).resolve().parents[2] / "server" / "src" / "http" / "openapi.json"
URI = "urn:botfleet:openapi"


def validator(name: str) -> jsonschema.Draft202012Validator:
    """``components.schemas.<name>``, its $refs resolved within the document."""
    doc = json.loads(OPENAPI.read_text())
    schemas = doc["components"]["schemas"]
    assert name in schemas, f"{OPENAPI} has no components.schemas.{name}"
    jsonschema.Draft202012Validator.check_schema(schemas[name])
    registry = Registry().with_resource(URI, Resource.from_contents(doc, default_specification=DRAFT202012))
    return jsonschema.Draft202012Validator(
        {"$ref": f"{URI}#/components/schemas/{name}"},
        registry=registry,
        format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER,
    )


def errors(name: str, instance) -> list[str]:
    return [f"{list(e.absolute_path)}: {e.message}" for e in validator(name).iter_errors(instance)]
