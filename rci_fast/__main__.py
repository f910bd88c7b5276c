from rci_fast.cli import main

raise SystemExit(main())
