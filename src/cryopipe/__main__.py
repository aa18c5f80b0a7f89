from cryopipe.cli import main

raise SystemExit(main())
