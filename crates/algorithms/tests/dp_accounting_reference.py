#!/usr/bin/env python3
"""Reference ε values from Google's dp-accounting (pip install dp-accounting) for the RDP
accountant of fledge-algorithms (src/privacy/accountant.rs).

For every point of a grid of noise multipliers, Poisson sampling rates and step counts it
composes `steps` Poisson-subsampled Gaussian mechanisms in dp_accounting's RdpAccountant
(default orders) and records ε at δ. Prints the table as JSON on stdout.

    python3 crates/algorithms/tests/dp_accounting_reference.py \
        > crates/algorithms/tests/data/dp_accounting_reference.json

tests/accountant.rs compares the Rust accountant with the committed JSON always, and with a
fresh run of this script whenever `python3 -c "import dp_accounting"` works.
"""

import json
import sys
from importlib import metadata

import dp_accounting
from absl import logging
from dp_accounting import rdp

# dp_accounting warns (once per order) when the fractional-order series does not converge and
# excludes that order; the Rust port does the same, silently.
logging.set_verbosity(logging.ERROR)

NOISE_MULTIPLIERS = [0.5, 0.8, 1.0, 1.3, 2.0, 4.0, 10.0]
SAMPLING_RATES = [0.001, 0.01, 0.05, 0.2, 0.6, 1.0]
STEPS = [1, 10, 100, 1000, 10000]
DELTAS = [1e-5, 1e-3]


def main() -> int:
    rows = []
    for sigma in NOISE_MULTIPLIERS:
        for q in SAMPLING_RATES:
            for steps in STEPS:
                for delta in DELTAS:
                    acc = rdp.RdpAccountant()
                    event = dp_accounting.SelfComposedDpEvent(
                        dp_accounting.PoissonSampledDpEvent(
                            q, dp_accounting.GaussianDpEvent(sigma)
                        ),
                        steps,
                    )
                    acc.compose(event)
                    eps = acc.get_epsilon(delta)
                    rows.append(
                        {
                            "noise_multiplier": sigma,
                            "sampling_rate": q,
                            "steps": steps,
                            "delta": delta,
                            "epsilon": eps,
                        }
                    )
    json.dump(
        {
            "generator": "dp-accounting " + metadata.version("dp-accounting"),
            "accountant": "RdpAccountant (default orders), PoissonSampledDpEvent(GaussianDpEvent)",
            "rows": rows,
        },
        sys.stdout,
        indent=1,
    )
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
