from auth_svc.server import main

main()
