from multibroker.cli import main

main()
