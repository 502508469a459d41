"""Belief field encode+encrypt / decrypt+decode throughput versus raw Fernet.

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

    import numpy as np
    from cryptography.fernet import Fernet
    from django.conf import settings
    from django.db import connection

    from agents.encryption import encode_array
    from agents.models import Agent

    field = Agent._meta.get_field("belief_state")
    fernet = Fernet(settings.FREEAGENTICS_ENCRYPTION_KEYS[0])
    ops = range(args.ops)
    print(f"rounds={args.rounds} ops/round={args.ops}; medians of per-round rates")
    for size in (64, 1024):
        array = np.random.default_rng(size).random(size)
        plaintext = encode_array(array)
        token = field.get_db_prep_value(array, connection)

        def field_encrypt(array=array):
            for _ in ops:
                field.get_db_prep_value(array, connection)
            return args.ops

        def raw_encrypt(plaintext=plaintext):
            for _ in ops:
                fernet.encrypt(plaintext)
            return args.ops

        def field_decrypt(token=token):
            for _ in ops:
                field.from_db_value(token, None, connection)
            return args.ops

        def raw_decrypt(token=token):
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
            f"{size}-element float64 ({len(plaintext)} B plaintext, {len(token)} B token)",
            [(name, f"{rate:,.0f} ops/s") for name, rate in m.items()]
            + [
                ("encrypt ratio field/raw", f"{enc_ratio:.3f} (target >= 0.8)"),
                ("decrypt ratio field/raw", f"{dec_ratio:.3f} (target >= 0.8)"),
            ],
        )


if __name__ == "__main__":
    main()
