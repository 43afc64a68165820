from threegate.cli import main

raise SystemExit(main())
