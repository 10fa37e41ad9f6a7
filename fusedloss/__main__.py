from fusedloss.cli import main

raise SystemExit(main())
