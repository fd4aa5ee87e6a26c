from pymaddy.cli.main import main

raise SystemExit(main())
