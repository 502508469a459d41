import base64

import numpy as np
import pytest
from cryptography.fernet import Fernet
from django.core.exceptions import FieldError, ImproperlyConfigured
from django.db import connection
from django.test import override_settings

from agents.encryption import (
    decode_array,
    decrypt_array,
    encode_array,
    encrypt_array,
    encrypt_arrays,
    multi_fernet,
)
from agents.exceptions import BeliefStateDecryptionError, BeliefStateFormatError
from agents.models import Agent
from tests import factories

ARRAYS = [
    np.linspace(0.0, 1.0, 64),
    np.arange(24, dtype=np.float64).reshape(2, 3, 4) / 7,
    np.random.default_rng(1).random((5, 7)).astype(np.float32),
    np.arange(-10, 10, dtype=np.int64),
    np.arange(12, dtype=np.int32).reshape(3, 4),
    np.array([True, False, True]),
    np.array(3.5),
    np.zeros((0, 4)),
    np.asfortranarray(np.arange(6, dtype=np.float64).reshape(2, 3)),
    np.arange(6, dtype=">f8"),
]


def raw_belief_state(agent):
    with connection.cursor() as c:
        c.execute("SELECT belief_state FROM agents WHERE id = %s", [agent.pk])
        return bytes(c.fetchone()[0])


@pytest.mark.parametrize("array", ARRAYS, ids=lambda a: f"{a.dtype.str}{a.shape}")
def test_encoding_keeps_dtype_shape_and_values_exactly(array):
    decoded = decode_array(encode_array(array))
    assert decoded.dtype == array.dtype
    assert decoded.shape == array.shape
    assert np.array_equal(decoded, array)
    assert decoded.flags.writeable


@pytest.mark.django_db
@pytest.mark.parametrize("array", ARRAYS[:6], ids=lambda a: f"{a.dtype.str}{a.shape}")
def test_field_round_trip_through_postgres(tenant, array):
    agent = factories.make_agent(tenant, belief_state=array)
    loaded = Agent.objects.get(pk=agent.pk).belief_state
    assert loaded.dtype == array.dtype
    assert loaded.shape == array.shape
    assert np.array_equal(loaded, array)


@pytest.mark.django_db
def test_stored_bytes_contain_no_plaintext(tenant):
    array = np.random.default_rng(7).random(64)
    agent = factories.make_agent(tenant, belief_state=array)
    stored = raw_belief_state(agent)
    plain = array.tobytes()
    assert plain not in stored
    # Not even one value's 8 bytes appear.
    assert not any(plain[i : i + 8] in stored for i in range(0, len(plain), 8))
    assert encode_array(array) not in stored


@pytest.mark.django_db
def test_wrong_key_raises_error_naming_model_and_field(tenant):
    agent = factories.make_agent(tenant)
    with (
        override_settings(FREEAGENTICS_ENCRYPTION_KEYS=[Fernet.generate_key().decode()]),
        pytest.raises(BeliefStateDecryptionError, match=r"agents\.Agent\.belief_state"),
    ):
        Agent.objects.get(pk=agent.pk)


@pytest.mark.django_db
def test_corrupt_token_raises_error_naming_model_and_field(tenant):
    agent = factories.make_agent(tenant)
    stored = bytearray(raw_belief_state(agent))
    stored[40] = ord("A") if stored[40] != ord("A") else ord("B")
    with connection.cursor() as c:
        c.execute("UPDATE agents SET belief_state = %s WHERE id = %s", [bytes(stored), agent.pk])
    with pytest.raises(BeliefStateDecryptionError, match=r"agents\.Agent\.belief_state"):
        Agent.objects.get(pk=agent.pk)


def test_garbage_plaintext_under_a_valid_key_is_a_format_error():
    token = multi_fernet().encrypt(b"not an array")
    from agents.encryption import decrypt_array

    with pytest.raises(BeliefStateFormatError, match="FAB1"):
        decrypt_array(token)
    truncated = multi_fernet().encrypt(encode_array(np.arange(8.0))[:-3])
    with pytest.raises(BeliefStateFormatError, match="data bytes"):
        decrypt_array(truncated)


def test_object_arrays_and_non_arrays_are_refused():
    with pytest.raises(TypeError, match="dtype object"):
        encode_array(np.array([{}, []], dtype=object))
    with pytest.raises(TypeError, match=r"numpy\.ndarray"):
        encode_array([1.0, 2.0])


@pytest.mark.django_db
def test_field_refuses_non_array_values(tenant):
    with pytest.raises(TypeError, match=r"agents\.Agent\.belief_state takes a numpy.ndarray"):
        factories.make_agent(tenant, belief_state=[0.5, 0.5])


@pytest.mark.django_db
def test_lookups_other_than_isnull_are_refused(tenant):
    agent = factories.make_agent(tenant)
    factories.make_agent(tenant, belief_state=None)
    assert list(Agent.objects.filter(belief_state__isnull=False)) == [agent]
    for lookup in ("belief_state", "belief_state__exact", "belief_state__gt"):
        with pytest.raises(FieldError, match="only the 'isnull' lookup"):
            Agent.objects.filter(**{lookup: agent.belief_state})
    with pytest.raises(FieldError, match="encrypted"):
        Agent.objects.filter(belief_state__in=[agent.belief_state])


@pytest.mark.django_db
def test_bad_key_configuration_names_the_variable(tenant):
    with (
        override_settings(FREEAGENTICS_ENCRYPTION_KEYS=["not-a-key"]),
        pytest.raises(ImproperlyConfigured, match="FREEAGENTICS_ENCRYPTION_KEYS entry 1"),
    ):
        encrypt_array(np.arange(3.0), tenant_id=tenant.id)


@pytest.mark.django_db
def test_a_batch_encrypts_like_one_array_at_a_time_with_its_own_iv_each(tenant):
    arrays = [a for a in ARRAYS if a.size] * 3
    tokens = encrypt_arrays(arrays, tenant_id=tenant.id)
    single = encrypt_array(arrays[0], tenant_id=tenant.id)
    # The same envelope (magic and data key id), then a Fernet token of the same length.
    assert {token[:8] for token in tokens} == {single[:8]}
    assert len(tokens[0]) == len(single)
    for array, token in zip(arrays, tokens, strict=True):
        decrypted = decrypt_array(token, tenant_id=tenant.id)
        assert decrypted.dtype == array.dtype and np.array_equal(decrypted, array)
    # Fernet's IV sits after its version byte and timestamp: no two tokens share one.
    ivs = {base64.urlsafe_b64decode(token[8:])[9:25] for token in tokens}
    assert len(ivs) == len(tokens)
    assert encrypt_arrays([], tenant_id=tenant.id) == []
