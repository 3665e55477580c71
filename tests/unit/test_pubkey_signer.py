"""The accepted _auth reply's publish-key signature always matches the key signing the reply."""

from __future__ import annotations

from hamaster import crypto
from hamaster.bus import messages


def test_auth_answered_while_the_master_adopts_a_new_keypair_verifies() -> None:
    """The window the X9.31 failures came from: ``_adopt_identity`` has switched the handler
    to the cluster's new master key but the publish key is still signed by the old one (an
    ``_auth`` answered in a store-pool thread at that moment). The reply must still carry a
    publish-key signature the minion can verify with the key the reply is signed with."""
    from tests.unit.request_fuzz import MINION_ID, make_rig, resolve

    rig = make_rig()
    try:
        new_priv_pem, new_pub_pem = crypto.generate_keypair(2048)
        rig.handler.master_priv = crypto.load_private_key(new_priv_pem)
        rig.handler.master_pub_text = crypto.normalize_pem(new_pub_pem)
        nonce = messages.new_nonce()
        frame, token = messages.auth_request(MINION_ID, rig.minion_pub_text, nonce, None)
        result = messages.parse_auth_reply(
            resolve(rig.handler.handle(frame)), minion_priv=rig.minion_priv, nonce=nonce,
            token_plain=token, pinned_master_pub=crypto.normalize_pem(new_pub_pem))
        assert result.status == "accepted"
    finally:
        rig.close()
