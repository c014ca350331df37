#!/usr/bin/env bash
# The README's test command: set up the test environment, fetch Fashion-MNIST for the
# real-data tests, run the suite.  Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")"
source env.sh requirements-test.txt
bash setup_fashion_mnist.sh ./data
python -m pytest tests "$@"
