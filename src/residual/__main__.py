import sys

from .cli import main
from .train.distributed import end_worker

code = main()
end_worker(code)  # a torchrun worker that finished ends here
sys.exit(code)
