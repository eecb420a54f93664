"""The token dispatch hands a backend with each command, which the backend hands back with the
command's result: ``<signature>:<entity id>``, the signature an HMAC of ``entity/command``
under ``DERCMD_CALLBACK_SECRET``. It proves a result came from the backend dispatch gave the
command to (nobody else can report one), and says which entity it is about; every replica
checks any token, since they share the secret."""

from __future__ import annotations

import hashlib
import hmac


class ResultTokens:
    def __init__(self, secret: str) -> None:
        self._secret = secret.encode()

    def signature(self, entity_id: str, command_id: str) -> str:
        return hmac.new(self._secret, f"{entity_id}/{command_id}".encode(), hashlib.sha256).hexdigest()[:32]

    def token(self, entity_id: str, command_id: str) -> str:
        return f"{self.signature(entity_id, command_id)}:{entity_id}"

    def entity_of(self, token: str, command_id: str) -> str | None:
        """The entity a result's token names, if the token is genuine for this command."""
        signature, _, entity_id = token.partition(":")
        if entity_id and hmac.compare_digest(signature, self.signature(entity_id, command_id)):
            return entity_id
        return None
