"""Belief encode+encrypt / decrypt+decode throughput (envelope tokens under a tenant's
data key, the path every write and read takes) versus raw Fernet.

    .venv/bin/python benchmarks/encryption.py [--rounds 15] [--ops 2000]

Target: the field reaches at least 0.8 of raw Fernet's throughput.
"""

import argparse

from common import interleaved, median, report, setup


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--ops", type=int, default=2000)
    args = parser.parse_args()
    setup(database=False)

    import math
    import uuid

    import numpy as np
    from cryptography.fernet import Fernet
    from django.db import connection

    from agents import data_keys
    from agents.encryption import encode_array, encrypt_array
    from agents.models import Agent

    field = Agent._meta.get_field("belief_state")
    fernet = Fernet(Fernet.generate_key())
    # The data key as a process holds it once unwrapped (no database in this benchmark).
    tenant_id = uuid.uuid4()
    key = data_keys.DataKey(1, tenant_id, Fernet(Fernet.generate_key()))
    data_keys._cache.remember(key)
    data_keys._cache.active[tenant_id] = (key, math.inf)
    ops = range(args.ops)
    print(f"rounds={args.rounds} ops/round={args.ops}; medians of per-round rates")
    for size in (64, 1024):
        array = np.random.default_rng(size).random(size)
        plaintext = encode_array(array)
        token = encrypt_array(array, tenant_id=tenant_id)
        raw_token = fernet.encrypt(plaintext)

        def field_encrypt(array=array):
            for _ in ops:
                encrypt_array(array, tenant_id=tenant_id)
            return args.ops

        def raw_encrypt(plaintext=plaintext):
            for _ in ops:
                fernet.encrypt(plaintext)
            return args.ops

        def field_decrypt(token=token):
            for _ in ops:
                field.from_db_value(token, None, connection)
            return args.ops

        def raw_decrypt(token=raw_token):
            for _ in ops:
                fernet.decrypt(token)
            return args.ops

        rates = interleaved(
            {
                "field encode+encrypt": field_encrypt,
                "raw Fernet encrypt": raw_encrypt,
                "field decrypt+decode": field_decrypt,
                "raw Fernet decrypt": raw_decrypt,
            },
            args.rounds,
        )
        m = {name: median(values) for name, values in rates.items()}
        enc_ratio = m["field encode+encrypt"] / m["raw Fernet encrypt"]
        dec_ratio = m["field decrypt+decode"] / m["raw Fernet decrypt"]
        report(
            f"{size}-element float64 ({len(plaintext)} B plaintext, {len(token)} B token, "
            f"raw Fernet {len(raw_token)} B)",
            [(name, f"{rate:,.0f} ops/s") for name, rate in m.items()]
            + [
                ("encrypt ratio field/raw", f"{enc_ratio:.3f} (target >= 0.8)"),
                ("decrypt ratio field/raw", f"{dec_ratio:.3f} (target >= 0.8)"),
            ],
        )


if __name__ == "__main__":
    main()
