import sys

from llama_smart_proxy.supervisor.cli import main

sys.exit(main())
