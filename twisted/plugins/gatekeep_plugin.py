"""twistd plugin for gatekeep: ``twistd -n gatekeep --config gatekeep.yaml``.

Imports nothing heavy; twistd loads ``gatekeep.tap`` only when the plugin is used.
"""
from twisted.application.service import ServiceMaker

gatekeep = ServiceMaker(
    "gatekeep",
    "gatekeep.tap",
    "An identity-aware, recording access gateway for PostgreSQL, SSH and HTTP",
    "gatekeep",
)
