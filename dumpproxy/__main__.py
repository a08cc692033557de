from dumpproxy.cli import main

raise SystemExit(main())
