from qdpo.cli import main

main()
