from .early import main

main()
