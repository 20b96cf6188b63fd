"""
The control plane's view of the cluster (issue 17): which instances are
live and which sites each owns, as the database's leases say.

It reads the database, not this instance's keeper, so that every replica
gives the same answer, with or without C{--cluster}: an instance that runs
alone is not a member, and lists the members that run on its database
(usually none).
"""

from __future__ import annotations

from typing import Any

from mqttsvc.control.rpc.dispatcher import Call, Method
from mqttsvc.db.leases import Leases, Member

#: The JSON Schema of C{cluster.status}'s answer, for the OpenRPC document.
STATUS_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["instance", "cluster", "instances"],
    "properties": {
        "instance": {"type": "string", "description": "The instance that answered."},
        "cluster": {
            "type": "boolean",
            "description": "Whether the instance that answered runs with --cluster.",
        },
        "instances": {
            "type": "array",
            "description": "The live instances, in name order.",
            "items": {
                "type": "object",
                "required": [
                    "instance",
                    "sites",
                    "epochs",
                    "started_at",
                    "renewed_at",
                    "expires_at",
                ],
                "properties": {
                    "instance": {"type": "string"},
                    "sites": {
                        "type": "array",
                        "items": {"type": "string"},
                        "description": "The sites whose lease it holds, in site id order.",
                    },
                    "epochs": {
                        "type": "object",
                        "additionalProperties": {"type": "integer"},
                        "description": "Each of those sites' lease epoch (fencing token).",
                    },
                    "started_at": {"type": "string", "description": "ISO 8601: it joined."},
                    "renewed_at": {"type": "string", "description": "ISO 8601: last renewal."},
                    "expires_at": {
                        "type": "string",
                        "description": "ISO 8601: it is dead from then on unless it renews.",
                    },
                },
            },
        },
    },
}


class ClusterMethods:
    """
    C{cluster.status}, over the database's leases.

    @param instance: this instance's name (C{--instance}).
    @param clustered: whether this instance runs with C{--cluster}.
    """

    def __init__(self, leases: Leases, instance: str, *, clustered: bool) -> None:
        self._leases = leases
        self._instance = instance
        self._clustered = clustered

    def methods(self) -> list[Method]:
        return [
            Method(
                "cluster.status",
                self.cluster_status,
                summary="The live instances of the cluster, each with the sites it owns, "
                "their lease epochs and its last renewal.",
                result=STATUS_SCHEMA,
            )
        ]

    async def cluster_status(self, call: Call) -> dict[str, Any]:
        members = await self._leases.instances()
        return {
            "instance": self._instance,
            "cluster": self._clustered,
            "instances": [member_json(m) for m in members],
        }


def member_json(member: Member) -> dict[str, Any]:
    """One instance of C{cluster.status} (and C{service.status} in a cluster)."""
    return {
        "instance": member.instance,
        "sites": list(member.sites),
        "epochs": dict(member.sites),
        "started_at": member.started_at,
        "renewed_at": member.renewed_at,
        "expires_at": member.expires_at,
    }
