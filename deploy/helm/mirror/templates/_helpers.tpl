{{/* Names and labels shared by the templates. */}}

{{- define "mirror.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "mirror.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "mirror.selectorLabels" -}}
app.kubernetes.io/name: {{ include "mirror.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "mirror.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "mirror.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* The Secret holding upstream credentials and htpasswd, if the chart makes one. */}}
{{- define "mirror.secretName" -}}
{{- include "mirror.fullname" . }}
{{- end }}

{{- define "mirror.upstreamSecret" -}}
{{- if .Values.upstreamCredentials.existingSecret }}
{{- .Values.upstreamCredentials.existingSecret }}
{{- else if .Values.upstreamCredentials.password }}
{{- include "mirror.secretName" . }}
{{- end }}
{{- end }}

{{- define "mirror.htpasswdSecret" -}}
{{- if .Values.auth.existingSecret }}
{{- .Values.auth.existingSecret }}
{{- else if .Values.auth.htpasswd }}
{{- include "mirror.secretName" . }}
{{- end }}
{{- end }}

{{- define "mirror.scheme" -}}
{{- if .Values.tls.enabled }}HTTPS{{ else }}HTTP{{ end }}
{{- end }}

{{/* A probe from values, its httpGet speaking the listener's scheme. */}}
{{- define "mirror.probe" -}}
{{- $probe := deepCopy .probe }}
{{- if or $probe.tcpSocket $probe.exec $probe.grpc }}
{{- /* values given replace the default httpGet: a probe has one handler */}}
{{- $_ := unset $probe "httpGet" }}
{{- end }}
{{- if $probe.httpGet }}
{{- $_ := set $probe.httpGet "scheme" (include "mirror.scheme" .root) }}
{{- end }}
{{- toYaml $probe }}
{{- end }}

{{- define "mirror.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "mirror.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* cache.max_size of a pod on an emptyDir of persistence.size (e.g. 50Gi): 80% of it. */}}
{{- define "mirror.ephemeralBudget" -}}
{{- $size := toString .Values.persistence.size }}
{{- if not (regexMatch "^[1-9][0-9]*(Ki|Mi|Gi|Ti)$" $size) }}
{{- fail (printf "persistence.size %q: with persistence.enabled false it is the emptyDir's limit, written as a whole number of Ki, Mi, Gi or Ti (e.g. 50Gi)" $size) }}
{{- end }}
{{- $number := regexReplaceAll "[A-Za-z]+$" $size "" | int64 }}
{{- $unit := regexReplaceAll "^[0-9]+" $size "" }}
{{- $kib := dict "Ki" 1 "Mi" 1024 "Gi" 1048576 "Ti" 1073741824 }}
{{- $budget := div (mul $number (get $kib $unit) 8192) 10 }}
{{- if eq (mod $budget 1073741824) 0 }}{{ printf "%dGiB" (div $budget 1073741824) }}
{{- else if eq (mod $budget 1048576) 0 }}{{ printf "%dMiB" (div $budget 1048576) }}
{{- else }}{{ printf "%d" $budget }}{{ end }}
{{- end }}

{{/* "true" when the user sets the variable .name in env or extraEnv (the chart's own entry then gives way). */}}
{{- define "mirror.userSets" -}}
{{- $name := .name }}
{{- $found := hasKey .root.Values.env $name }}
{{- range .root.Values.extraEnv }}{{ if eq .name $name }}{{ $found = true }}{{ end }}{{ end }}
{{- if $found }}true{{ end }}
{{- end }}
