from pggeolearn.cli.main import main

main()
