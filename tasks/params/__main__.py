"""`python -m tasks.params > params.yaml`: the default params file."""

import sys

from tasks.params.render import render_defaults

sys.stdout.write(render_defaults())
